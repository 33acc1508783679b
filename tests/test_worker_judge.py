"""Judge-verified answer groups through a real worker process (``semcache worker`` with ``SEMCACHE_JUDGE=llm``)
asking a fake OpenAI-compatible judge server started by this module (tests/fake_judge.py), and explicit groups from
every place a write starts (a task, ``POST /api/v1/entries``, ``Generated``, the proxy's ``X-Semcache-Group``).

The worker has its own index (its task queue is named after it), so its counters and audit stream are this
module's; each test still uses its own tenants.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache_core import Generated, SemanticCache
from cache_core.apikeys import create_key
from cache_core.connection import make_client
from cache_core.schema import Scope, entry_id
from cache_core.stats import read_cumulative
from cache_core.grouping import judged_group_id
from cache_core.store import answer_group, get_document
from cache_core.testing import test_settings
from semcache.fakellm import FakeLLMServer, SimulatedLLM
from worker.app import create_celery
from worker.queue import CeleryWriteQueue
from worker.tasks import WRITE_ENTRIES

from .fake_judge import FakeJudge
from .fixtures_web import _make_app, _web_overrides, login, unique_tenant, wait_task
from .fixtures_worker import WorkerProcess, entry_keys, make_command, run_task

NEIGHBOURS = {
    "How do I reset my password?": "Go to Settings, then Security, and press Reset password.",
    "What are your opening hours?": "We are open from 9 to 17, Monday to Saturday.",
}
PARAPHRASE_YES = "How can I get a new password if I forgot it?"  # 0.81 to the first neighbour (MiniLM)
PARAPHRASE_NO = "When does the shop open on Saturdays?"  # 0.65 to the second


@pytest.fixture(scope="module")
def judge_server():
    server = FakeJudge().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def judge_worker(redis_url, worker_settings, judge_server):
    # the session worker's data dir: its ONNX export of the model is made once per session
    settings = test_settings(redis_url, index=f"jw{uuid.uuid4().hex[:8]}", data_dir=worker_settings.data_dir,
                             judge="llm", judge_url=judge_server.url, judge_model="judge-model",
                             judge_timeout_ms=1500, judge_min_similarity=0.5, max_retries=3, retry_backoff_s=0.2,
                             retry_backoff_max_s=1.0)
    worker = WorkerProcess(settings, worker_settings.data_dir / f"{settings.index}.log", concurrency=1).start()
    yield worker
    worker.stop()


@pytest.fixture
def judge(judge_server):
    judge_server.reset("no")
    return judge_server


@pytest.fixture(scope="module")
def redis(judge_worker):
    client = make_client(judge_worker.settings.redis_url, timeout_ms=5000)
    yield client
    client.close()


@pytest.fixture(scope="module")
def web(judge_worker, password_hash, embedder):
    settings = judge_worker.settings.model_copy(update=_web_overrides(password_hash))
    app = _make_app(settings, embedder, queue=None)
    yield app
    if "semcache_proxy" in app.extensions:
        app.extensions["semcache_proxy"].close()
    app.extensions["semcache"].close()


def write(worker, commands: list[dict]) -> dict:
    result = run_task(worker.app, WRITE_ENTRIES, commands=commands)
    assert result.state == "SUCCESS", result.result
    return result.result


def doc_of(redis, worker, tenant: str, prompt: str) -> dict | None:
    return get_document(redis, worker.settings, entry_id(prompt, Scope(tenant=tenant)))


def seed_neighbours(worker, judge, redis, tenant: str) -> dict[str, dict]:
    """The two neighbours of ``tenant``, written through the worker (no neighbours yet: the judge is not asked)."""
    write(worker, [make_command(tenant, p, r) for p, r in NEIGHBOURS.items()])
    assert judge.calls == 0
    return {p: doc_of(redis, worker, tenant, p) for p in NEIGHBOURS}


def _judged(response: str) -> str:
    """The group an entry founds while a judge is on (cache_core.grouping: j: + the hash of its answer)."""
    return judged_group_id(answer_group(response))


def judge_records(redis, settings, eid: str) -> list[dict]:
    out = []
    for _, fields in redis.xrange(settings.key("audit")):
        row = {k.decode(): v.decode() for k, v in fields.items()}
        if row.get("event") == "judge" and row.get("id") == eid:
            out.append(row)
    return out


def wait_doc(redis, worker, tenant: str, prompt: str, timeout_s: float = 60.0) -> dict | None:
    """The entry's document once the worker wrote it (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = doc_of(redis, worker, tenant, prompt)
        if doc is not None or time.monotonic() > deadline:
            return doc
        time.sleep(0.05)


# --- the judge decides ------------------------------------------------------------------------------------------------
def test_a_neighbour_the_judge_accepts_is_joined_and_a_rejected_one_is_not(judge_worker, judge, redis, web):
    s = judge_worker.settings
    tenant = unique_tenant("jy")
    neighbours = seed_neighbours(judge_worker, judge, redis, tenant)
    before = read_cumulative(redis, s)
    judge.rules = [("new password if I forgot", "yes")]  # anything else: no
    summary = write(judge_worker, [make_command(tenant, PARAPHRASE_YES, "Use the 'Forgot password' link."),
                                   make_command(tenant, PARAPHRASE_NO, "Saturdays from 9 to 17.")])
    assert "retries" not in summary
    assert summary["judge"] == {"yes": 1, "no": 1, "none": 0, "skipped": 0, "joined": 1}
    assert judge.calls == 2  # one question per entry: one neighbouring group each in the gray zone
    asked = {body["messages"][-1]["content"].split("\n")[1] for body in judge.bodies}
    assert asked == {PARAPHRASE_YES, PARAPHRASE_NO}

    joined = doc_of(redis, judge_worker, tenant, PARAPHRASE_YES)
    kept = doc_of(redis, judge_worker, tenant, PARAPHRASE_NO)
    first, second = neighbours["How do I reset my password?"], neighbours["What are your opening hours?"]
    assert joined["group"] == first["group"] == _judged(NEIGHBOURS["How do I reset my password?"])
    assert kept["group"] == _judged("Saturdays from 9 to 17.") != second["group"]

    (yes,) = judge_records(redis, s, joined["id"])
    assert yes["verdict"] == "yes" and yes["neighbour"] == first["id"] and yes["group"] == first["group"]
    assert yes["judge"] == "llm" and yes["tenant"] == tenant and 0.5 <= float(yes["similarity"]) < 1.0
    (no,) = judge_records(redis, s, kept["id"])
    assert no["verdict"] == "no" and no["neighbour"] == second["id"] and no["group"] == ""
    for record in (yes, no):  # never a prompt or an answer in the audit trail
        assert not any(word in value for value in record.values() for word in ("password", "Saturday", "open"))

    after = read_cumulative(redis, s)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("judge_yes", "judge_no", "judge_none", "judge_joined",
                                                               "judge_prompt_tokens", "judge_completion_tokens")}
    assert delta == {"judge_yes": 1, "judge_no": 1, "judge_none": 0, "judge_joined": 1, "judge_prompt_tokens": 114,
                     "judge_completion_tokens": 2}

    client = web.test_client()
    metrics = client.get("/metrics").get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(metrics)}  # the exposition parses
    assert families["semcache_judge_calls"].type == "counter"
    for name in ('semcache_judge_calls_total{verdict="yes"}', 'semcache_judge_calls_total{verdict="none"}',
                 "semcache_judge_skipped_total", "semcache_judge_joins_total",
                 'semcache_judge_tokens_total{kind="prompt"}'):
        value = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
        assert value is not None, name
    assert float(re.search(r'^semcache_judge_calls_total\{verdict="yes"\} (\S+)$', metrics, re.M).group(1)) == \
        after["judge_yes"]

    state = web.extensions["semcache"]
    admin, _ = create_key(state.redis, state.settings, admin=True)
    stats = client.get("/api/v1/stats?minutes=5", headers={"Authorization": f"Bearer {admin}"}).get_json()
    assert stats["lookups"]["judge"]["yes"] >= 1 and stats["lookups"]["judge"]["joined"] >= 1

    login(client)
    page = client.get(f"/entries/{joined['id']}").get_data(as_text=True)
    card = page[page.index('id="judge-verdicts"'):page.index('id="feedback"')]
    assert f'href="/entries/{first["id"]}"' in card and "<b>yes</b>" in card
    assert f"joined group <span class=\"mono\">{first['group']}</span>" in card and yes["similarity"] in card
    page = client.get(f"/entries/{kept['id']}").get_data(as_text=True)
    assert "<b>no</b>" in page and "joined group" not in page


@pytest.mark.parametrize("reply, detail", [
    ("500", "HTTP 500"), ("slow", "timeout"), ("Probably yes, the answer covers it.", "neither yes nor no"),
    ("badjson", "not a chat completion"),
])  # fmt: skip
def test_a_failing_slow_or_garbled_judge_leaves_the_entry_in_its_own_group_without_retry(judge_worker, judge, redis,
                                                                                         reply, detail):
    s = judge_worker.settings
    tenant = unique_tenant("jf")
    seed_neighbours(judge_worker, judge, redis, tenant)
    before = read_cumulative(redis, s).get("judge_none", 0)
    judge.reply = reply
    summary = write(judge_worker, [make_command(tenant, PARAPHRASE_YES, "Use the 'Forgot password' link.")])
    assert "retries" not in summary and summary["counts"]["approve"] == 1
    assert summary["results"][0]["outcome"] == "written" and summary["judge"]["none"] == 1
    assert judge.calls == 1  # asked once, never again
    doc = doc_of(redis, judge_worker, tenant, PARAPHRASE_YES)
    assert doc["status"] == "approved" and doc["group"] == _judged("Use the 'Forgot password' link.")
    (record,) = judge_records(redis, s, doc["id"])
    assert record["verdict"] == "none" and detail in record["detail"]
    assert read_cumulative(redis, s).get("judge_none", 0) == before + 1


def test_a_spent_budget_asks_nothing(judge_worker, judge, redis):
    s = judge_worker.settings
    tenant = unique_tenant("jb")
    seed_neighbours(judge_worker, judge, redis, tenant)
    judge.reply = "yes"
    minute = int(time.time() // 60)
    keys = [s.key(f"judge:budget:{m}") for m in (minute, minute + 1)]  # the write may start in the next minute
    for key in keys:
        redis.set(key, s.judge_budget_per_minute, ex=180)
    before = read_cumulative(redis, s).get("judge_skipped", 0)
    try:
        summary = write(judge_worker, [make_command(tenant, PARAPHRASE_YES, "Use the 'Forgot password' link.")])
    finally:
        redis.delete(*keys)
    assert judge.calls == 0 and summary["judge"]["skipped"] == 1
    doc = doc_of(redis, judge_worker, tenant, PARAPHRASE_YES)
    assert doc["group"] == _judged("Use the 'Forgot password' link.")
    (record,) = judge_records(redis, s, doc["id"])
    assert record["verdict"] == "none" and record["detail"].startswith("not asked: budget")
    assert read_cumulative(redis, s).get("judge_skipped", 0) == before + 1


def test_a_rewrite_of_the_same_prompt_is_not_asked_about_itself(judge_worker, judge, redis):
    tenant = unique_tenant("jr")
    write(judge_worker, [make_command(tenant, "How do I reset my password?", "Old answer: ask the admin.")])
    judge.reply = "yes"
    write(judge_worker, [make_command(tenant, "How do I reset my password?", "New answer: use Settings.")])
    assert judge.calls == 0  # its own older version is no neighbour
    assert doc_of(redis, judge_worker, tenant, "How do I reset my password?")["group"] == \
        _judged("New answer: use Settings.")


# --- explicit groups: never judged ------------------------------------------------------------------------------------
def test_an_explicit_group_in_a_command_is_kept_and_not_judged(judge_worker, judge, redis):
    tenant = unique_tenant("jx")
    seed_neighbours(judge_worker, judge, redis, tenant)
    judge.reply = "yes"
    summary = write(judge_worker, [make_command(tenant, PARAPHRASE_YES, "Use the link.", group="kb:doc-7")])
    assert judge.calls == 0 and summary["judge"]["yes"] == 0
    doc = doc_of(redis, judge_worker, tenant, PARAPHRASE_YES)
    assert doc["group"] == "kb:doc-7" and judge_records(redis, judge_worker.settings, doc["id"]) == []


def test_an_explicit_group_through_the_http_api(judge_worker, judge, redis, web):
    tenant = unique_tenant("ja")
    seed_neighbours(judge_worker, judge, redis, tenant)
    judge.reply = "yes"
    state = web.extensions["semcache"]
    key, _ = create_key(state.redis, state.settings, tenant=tenant)
    headers = {"Authorization": f"Bearer {key}"}
    client = web.test_client()
    response = client.post("/api/v1/entries", headers=headers,
                           json={"prompt": PARAPHRASE_YES, "response": "Use the link.", "group": "rag:doc-42 §3"})
    assert response.status_code == 202, response.get_json()
    assert wait_task(client, headers, response.get_json()["task_id"])["state"] == "success"
    assert doc_of(redis, judge_worker, tenant, PARAPHRASE_YES)["group"] == "rag:doc-42 §3"
    assert judge.calls == 0


def test_an_explicit_group_from_generated(judge_worker, judge, redis, embedder):
    tenant = unique_tenant("jg")
    seed_neighbours(judge_worker, judge, redis, tenant)
    judge.reply = "yes"
    s = judge_worker.settings
    queue = CeleryWriteQueue(create_celery(s), s)
    cache = SemanticCache.open(s, embedder=embedder, write_queue=queue, stats=False)
    try:
        answer = cache.get_or_generate(PARAPHRASE_YES, {"tenant": tenant},
                                       lambda: Generated(response="Use the link.", group="router:account"))
        assert not answer.cached and queue.flush()
    finally:
        cache.close()
        queue.close()
    doc = wait_doc(redis, judge_worker, tenant, PARAPHRASE_YES)
    assert doc is not None and doc["group"] == "router:account"
    assert judge.calls == 0


def test_an_explicit_group_from_the_proxy_header(judge_worker, judge, redis, password_hash, embedder):
    llm = SimulatedLLM(answer_for=lambda prompt: f"An answer to: {prompt}", base_ms=1, per_token_ms=0.0,
                       model="sim-judge")
    with FakeLLMServer(llm) as upstream:
        settings = judge_worker.settings.model_copy(update={**_web_overrides(password_hash),
                                                            "upstream_url": upstream.url})
        app = _make_app(settings, embedder, queue=None)
        try:
            state = app.extensions["semcache"]
            tenant = unique_tenant("jp")
            key, _ = create_key(state.redis, state.settings, tenant=tenant)
            client = app.test_client()

            def chat(question: str, **headers: str):
                return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}", **headers},
                                   json={"model": "sim-judge", "messages": [{"role": "user", "content": question}]})

            assert chat("How do I reset my password?").headers["X-Semcache"] == "miss"
            assert app.extensions["semcache_proxy"].writeback.flush()
            first = _wait_tenant_docs(redis, judge_worker, tenant, 1)
            judge.reply = "yes"  # the next one has a gray-zone neighbour now: only its explicit group spares it
            response = chat(PARAPHRASE_YES, **{"X-Semcache-Group": "faq:password"})
            assert response.status_code == 200 and response.headers["X-Semcache"] == "miss"
            assert app.extensions["semcache_proxy"].writeback.flush()
            docs = _wait_tenant_docs(redis, judge_worker, tenant, 2)
        finally:
            app.extensions["semcache_proxy"].close()
            app.extensions["semcache"].close()
    (second,) = [d for d in docs if d["prompt"] == PARAPHRASE_YES]
    assert second["group"] == "faq:password" and first[0]["group"] == _judged(first[0]["response"])
    assert judge.calls == 0


def _wait_tenant_docs(redis, worker, tenant: str, n: int, timeout_s: float = 60.0) -> list[dict]:
    """The tenant's documents once the worker wrote ``n`` of them (a bound on waiting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        keys = entry_keys(redis, worker.settings, tenant)
        if len(keys) >= n or time.monotonic() > deadline:
            return [get_document(redis, worker.settings, k[len(worker.settings.key_prefix):]) for k in keys]
        time.sleep(0.05)


def test_a_hanging_judge_stops_being_asked_at_a_third_of_the_task_time_limit(make_settings, redis_client, embedder,
                                                                             judge):
    """In process (worker.judging.judge_batch on the session Redis): with a 3 s task limit the questions stop after
    1 s, so a judge that never answers cannot keep a task past its limit (a killed task would be retried and
    dead-lettered). The first question times out (1.5 s), the two after it are not asked."""
    from cache_core.index import IndexSpec, ensure_index
    from cache_core.judge import make_judge
    from cache_core.schema import WriteCommand
    from cache_core.store import write_command
    from worker.judging import judge_batch, judge_counters

    s = make_settings(judge="llm", judge_url=judge.url, judge_model="m", judge_timeout_ms=1500, judge_concurrency=1,
                      task_time_limit_s=3)
    ensure_index(redis_client, IndexSpec(settings=s, dim=embedder.dim, model_name=embedder.name))
    scope = Scope(tenant="t")
    for prompt, response in NEIGHBOURS.items():
        write_command(redis_client, s, embedder, WriteCommand(prompt=prompt, response=response, scope=scope))
    judge.reply = "slow"
    news = [PARAPHRASE_YES, PARAPHRASE_NO, "What time do you open?"]
    vectors = embedder.embed(news)
    items = [(WriteCommand(prompt=p, response=f"answer {i}", scope=scope), v.tolist())
             for i, (p, v) in enumerate(zip(news, vectors))]
    decisions = judge_batch(redis_client, s, make_judge(s, client=redis_client), items)
    assert judge.calls == 1
    assert [d.verdicts[0]["detail"].split(" ")[0] for d in decisions] == ["timeout", "not", "not"]
    assert judge_counters(decisions) == {"judge_none": 1, "judge_skipped": 2}
    assert not any(d.joined for d in decisions)  # each keeps a judged group of its own


# --- the other judges in a real worker, and a configuration that cannot work --------------------------------------
def test_a_cross_encoder_judge_loaded_by_path_in_a_real_worker(redis_url, worker_settings, redis, tmp_path):
    """``SEMCACHE_JUDGE=cross-encoder`` with a tiny real CrossEncoder saved to a path (its classifier's bias makes
    every score about 0.998): the worker loads it before its pool forks and the paraphrase joins the neighbour."""
    from .test_judge import tiny_cross_encoder

    model = tiny_cross_encoder(tmp_path / "ce", bias=6.0)
    settings = test_settings(redis_url, index=f"jc{uuid.uuid4().hex[:8]}", data_dir=worker_settings.data_dir,
                             judge="cross-encoder", judge_cross_encoder_model=model, judge_min_similarity=0.5,
                             judge_cross_encoder_threshold=0.9)
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=1).start()
    try:
        tenant = unique_tenant("jce")
        write(worker, [make_command(tenant, "How do I reset my password?", NEIGHBOURS["How do I reset my password?"])])
        summary = write(worker, [make_command(tenant, PARAPHRASE_YES, "Use the 'Forgot password' link.")])
    finally:
        worker.stop()
    assert summary["judge"]["yes"] == 1 and summary["judge"]["joined"] == 1
    doc = get_document(redis, settings, entry_id(PARAPHRASE_YES, Scope(tenant=tenant)))
    assert doc["group"] == _judged(NEIGHBOURS["How do I reset my password?"])
    (record,) = judge_records(redis, settings, doc["id"])
    assert record["judge"] == "cross-encoder" and record["detail"].startswith("score 0.99")


def test_a_judge_configuration_that_cannot_work_stops_the_worker_at_start(redis_url, worker_settings, tmp_path):
    settings = test_settings(redis_url, index=f"jn{uuid.uuid4().hex[:8]}", data_dir=worker_settings.data_dir,
                             judge="llm", judge_url="http://127.0.0.1:9/v1")  # no SEMCACHE_JUDGE_MODEL
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=1)
    with pytest.raises(RuntimeError, match="worker exited"):
        worker.start()
    assert "SEMCACHE_JUDGE=llm needs a model" in worker.log_text()
