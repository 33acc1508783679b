"""Issue 15: a task that kills its worker process was redelivered forever (late acknowledgement with
``task_reject_on_worker_lost`` puts it back on the queue every time its process dies).

Now a task whose process died ``MAX_WORKER_LOSSES`` times in a row while running it is not run again: it becomes a
dead letter (to replay once the cause is found). One death, the usual case (a deploy, a SIGKILL), still redelivers.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from cache_core.deadletters import list_dead_letters
from cache_core.testing import test_settings
from worker.tasks import MAX_WORKER_LOSSES, WRITE_ENTRIES

from .fixtures_worker import make_command


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _until(check, what: str, timeout_s: float = 180.0):
    """Poll ``check`` until it returns something truthy (a bound for a loaded machine, not a timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def test_a_task_that_keeps_killing_its_worker_process_becomes_a_dead_letter(tmp_path, redis_url, redis_client,
                                                                            worker_factory):
    settings = test_settings(redis_url, data_dir=tmp_path, max_retries=3, retry_backoff_s=0.2,
                             retry_backoff_max_s=1.0)
    worker = worker_factory(settings, concurrency=1)
    tenant = f"k-{uuid.uuid4().hex[:8]}"
    # long enough to be running when its process is killed: 1,000 prompts to embed on a small machine
    commands = [make_command(tenant, f"Question number {i} about the history of {uuid.uuid4().hex}?")
                for i in range(1000)]
    task_id = worker.app.send_task(WRITE_ENTRIES, kwargs={"commands": commands}).id
    starts = settings.key(f"taskstarts:{task_id}")
    for death in range(1, MAX_WORKER_LOSSES + 1):
        _until(lambda: int(redis_client.get(starts) or 0) >= death, f"start {death} of the task")
        for child in _children(worker.process.pid):  # what the OOM killer does to a pool process
            os.kill(child, signal.SIGKILL)

    def lettered():
        return [d for d in list_dead_letters(redis_client, settings, limit=100) if d.task_id == task_id]

    letters = _until(lettered, "the dead letter")
    assert f"died {MAX_WORKER_LOSSES} times" in letters[0].reason
    assert letters[0].kwargs["commands"][0]["prompt"] == commands[0]["prompt"]
    _until(lambda: worker.app.AsyncResult(task_id).state == "FAILURE", "the task to fail")
    assert redis_client.get(starts) is None
    assert worker.alive()
