"""Issue 15 item 3: the embedded Redis had no password and its files were readable by every local user.

Now it runs with a generated password (``requirepass``, from a 0600 config file, never on its command line), kept
0600 in a 0700 data directory, and every process that finds the server through the data directory uses it.
"""

from __future__ import annotations

import logging
import stat

import pytest
import redis

from cache_core.connection import open_redis, with_db
from cache_core.embedded import EmbeddedRedis, free_port
from cache_core.testing import test_settings
from worker.app import create_celery


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_server_needs_its_generated_password(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="cache_core.embedded")
    data = tmp_path / "r"
    server = EmbeddedRedis(data, appendonly=True, port=free_port())
    url = server.start()
    try:
        password = (data / "redis.password").read_text().strip()
        assert len(password) >= 32 and f":{password}@" in url
        assert _mode(data) == 0o700 and _mode(data / "redis.password") == 0o600
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()  # before: any local user could read and write every key
        anonymous.close()
        assert redis.Redis.from_url(url, socket_timeout=5).ping()
        cmdline = open(f"/proc/{server.process.pid}/cmdline", "rb").read().decode()
        assert password not in cmdline  # the command line of a process is world-readable
        assert password not in caplog.text
        assert EmbeddedRedis(data).running_url() == url  # another process of this data dir finds it, with it
        written = [data / "redis.conf", data / "redis.log", *(data / "appendonlydir").rglob("*")]
        assert len(written) > 3 and all(_mode(path) & 0o077 == 0 for path in written)  # the server's umask: 077
    finally:
        server.stop()
    again = EmbeddedRedis(data, appendonly=True, port=server.port)  # a restart keeps the same password
    try:
        assert again.start() == url
    finally:
        again.stop()


def test_every_process_of_the_data_dir_uses_the_password(tmp_path):
    """The library's handle, the broker URL derived from it and the worker's lookup of a running server."""
    settings = test_settings(None, data_dir=tmp_path / "d", index="pw")
    handle = open_redis(settings)
    try:
        password = (tmp_path / "d" / "redis.password").read_text().strip()
        assert handle.writer().ping() and f":{password}@" in handle.url
        assert f":{password}@" in handle.broker_url
        app = create_celery(settings, redis_url=handle.url)
        assert app.conf.broker_url == with_db(handle.url, 1)
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
        app.close()
        from worker.runtime import cache_url

        assert cache_url(settings) == handle.url
    finally:
        handle.close()
