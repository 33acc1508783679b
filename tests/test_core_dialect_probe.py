"""The startup probe of the read path's KNN shape: ``FT.SEARCH ... RETURN 3 $['a','b',...] AS view DIALECT 3``
must return every member of the JSONPath union (cache_core/connection.py, ``check_union_return``).

Everything runs against the session's real embedded Redis; the failing replies are the server's own DIALECT 2 and
bad-dialect answers to the probe's query, plus hand-made replies of the same shape.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit
import threading

import pytest
import redis

from cache_core import connection
from cache_core.connection import (
    check_modules,
    check_union_reply,
    check_union_return,
    make_client,
    open_redis,
    probe_union_return,
)
from cache_core.errors import ConfigError
from cache_core.query import KNN_DIALECT, RETURN_FIELDS, search_args


@pytest.fixture(autouse=True)
def _fresh_probe_cache(monkeypatch):
    """Each test starts as a new process would: no server checked yet."""
    monkeypatch.setattr(connection, "_UNION_CHECKED", set())


def _leftovers(client: redis.Redis, key_prefix: str) -> tuple[list, list]:
    """Probe keys under ``key_prefix`` and probe indexes anywhere on the server."""
    keys = sorted(client.scan_iter(match=f"{key_prefix}union-probe*", count=1000))
    indexes = [connection.text(name) for name in client.execute_command("FT._LIST")]
    return keys, [name for name in indexes if "union-probe" in name]


def _ft_create_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_FT.CREATE", {}).get("calls", 0))


def test_the_probe_checks_the_shape_of_the_read_paths_knn():
    """The probe exists because the read path returns its fields as one union under KNN_DIALECT: if that changes,
    this test says the probe (which sends KNN_DIALECT) must change with it."""
    args = search_args("idx", "*=>[KNN 3 @embedding $v AS dist]", {"v": b"x"}, 3)
    assert args[args.index("DIALECT") + 1] == KNN_DIALECT
    assert any(str(field).startswith("$[") for field in RETURN_FIELDS)
    assert KNN_DIALECT == "3"  # the only dialect (with 4) whose union RETURN holds every member


@pytest.mark.parametrize("protocol", [3, 2])
def test_the_probe_passes_on_the_embedded_server_and_leaves_nothing(redis_url, make_settings, protocol):
    settings = make_settings()
    prefix = settings.key("")
    client = redis.Redis.from_url(redis_url, protocol=protocol)
    try:
        reply = probe_union_return(client, key_prefix=prefix, dialect=KNN_DIALECT)
        check_union_reply(reply, server="embedded")  # no error: every member came back
        check_union_return(client, redis_url, key_prefix=prefix)
        assert connection._safe(redis_url) in connection._UNION_CHECKED
        assert _leftovers(client, prefix) == ([], [])
    finally:
        client.close()


def test_the_result_is_cached_per_process_and_server(redis_client, redis_url, make_settings):
    prefix = make_settings().key("")
    check_union_return(redis_client, redis_url, key_prefix=prefix)
    calls = _ft_create_calls(redis_client)
    check_union_return(redis_client, redis_url, key_prefix=prefix)
    check_modules(redis_client, redis_url, key_prefix=prefix)
    assert _ft_create_calls(redis_client) == calls  # no second probe
    connection._UNION_CHECKED.clear()  # another process, or another server
    check_union_return(redis_client, redis_url, key_prefix=prefix)
    assert _ft_create_calls(redis_client) == calls + 1


def test_open_redis_runs_the_probe_under_the_deployments_keys(redis_client, redis_url, make_settings):
    settings = make_settings()
    with open_redis(settings) as handle:
        assert handle.reader().ping()
    assert connection._safe(redis_url) in connection._UNION_CHECKED
    assert _leftovers(redis_client, settings.key("")) == ([], [])


def test_processes_starting_at_once_never_collide(redis_url, make_settings):
    """Eight clients (one connection each, as eight processes would have) probe at the same moment."""
    prefix = make_settings().key("")
    barrier, errors = threading.Barrier(8), []

    def start() -> None:
        client = make_client(redis_url, timeout_ms=5000, max_connections=2)
        try:
            barrier.wait()
            check_union_reply(probe_union_return(client, key_prefix=prefix, dialect=KNN_DIALECT), server="x")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with make_client(redis_url, timeout_ms=5000) as client:
        assert _leftovers(client, prefix) == ([], [])


@pytest.mark.parametrize("protocol", [3, 2])
def test_a_dialect_2_reply_is_a_config_error_with_what_to_do(redis_url, make_settings, protocol):
    """The server's own answer to the probe under DIALECT 2 (a union's first member only) is refused."""
    prefix = make_settings().key("")
    client = redis.Redis.from_url(redis_url, protocol=protocol)
    try:
        reply = probe_union_return(client, key_prefix=prefix, dialect="2")
        assert _leftovers(client, prefix) == ([], [])
    finally:
        client.close()
    with pytest.raises(ConfigError) as info:
        check_union_reply(reply, server="redis://db:6379/0 (redis 9.0.0, search 9.0.0)")
    message = str(info.value)
    assert "redis://db:6379/0 (redis 9.0.0, search 9.0.0)" in message
    assert "returned 'semcache'" in message and "as DIALECT 2 does" in message
    assert "Redis 8.0-8.x with Search and JSON" in info.value.hint
    assert "docker-compose image (redis:8)" in info.value.hint


@pytest.mark.parametrize("reply", [
    {b"total_results": 1, b"results": [{b"id": b"k", b"extra_attributes": {b"view": b"semcache"}}]},
    {"total_results": 1, "results": [{"id": "k", "extra_attributes": {"view": "semcache"}}]},
    [1, b"k", [b"view", b"semcache"]],
    [1, b"k", [b"view", b'["semcache",7]']],  # some members only
    {b"total_results": 0, b"results": []},
    [0],
    None,
], ids=["resp3", "resp3-str", "resp2", "partial", "empty", "resp2-empty", "none"])
def test_replies_without_every_member_are_refused(reply):
    with pytest.raises(ConfigError) as info:
        check_union_reply(reply, server="redis://db:6379/0 (redis 9.0.0)")
    assert "DIALECT 3" in str(info.value)
    assert "redis:8" in info.value.hint


def test_a_refused_dialect_is_a_config_error(redis_client, make_settings):
    """What a server that dropped the dialect answers (here: the real error for an unknown dialect)."""
    reply = probe_union_return(redis_client, key_prefix=make_settings().key(""), dialect="5")
    assert isinstance(reply, redis.ResponseError)
    with pytest.raises(ConfigError, match=r"DIALECT 3 refused it: DIALECT requires"):
        check_union_reply(reply, server="x")


def test_a_server_that_refuses_the_setup_is_logged_not_refused(redis_client, redis_url, make_settings, caplog):
    """A user without FT.CREATE (ACL) cannot run the probe: a warning, no cache entry, and nothing left behind."""
    prefix = make_settings().key("")
    user = f"probe-{prefix.rstrip(':')}"
    redis_client.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-ft.create")
    where = urlsplit(redis_url)  # the session server's URL carries its password: replace the credentials
    limited_url = f"redis://{user}:pw@{where.hostname}:{where.port}{where.path}"
    limited = make_client(limited_url, timeout_ms=5000)
    try:
        with pytest.raises(redis.ResponseError, match="FT.CREATE of the probe failed"):
            probe_union_return(limited, key_prefix=prefix, dialect=KNN_DIALECT)
        with caplog.at_level(logging.WARNING, logger="cache_core.connection"):
            check_union_return(limited, limited_url, key_prefix=prefix)
        assert "could not check FT.SEARCH ... DIALECT 3" in caplog.text
        assert "pw@" not in caplog.text  # the URL is logged without credentials
        assert connection._UNION_CHECKED == set()
        assert _leftovers(redis_client, prefix) == ([], [])
    finally:
        limited.close()
        redis_client.execute_command("ACL", "DELUSER", user)


def test_the_server_version_names_redis_and_search(redis_client):
    assert re.fullmatch(r"redis \d+\.\d+\.\d+, search \d+\.\d+\.\d+", connection._server_version(redis_client))
