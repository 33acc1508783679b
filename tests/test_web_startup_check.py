"""The web app checks an external server at startup like the worker does: refuse a server without Search/JSON,
start (and say why) when the server is merely unreachable."""

from __future__ import annotations

import logging

import pytest

from cache_core.embedded import free_port
from cache_core.errors import ConfigError
from cache_core.testing import test_settings
from web.app import create_app


def test_web_refuses_an_external_server_without_search_and_json(plain_redis_url, tmp_path):
    with pytest.raises(ConfigError) as info:
        create_app(test_settings(plain_redis_url, data_dir=tmp_path))
    assert "redis:8" in str(info.value)


def test_web_starts_against_an_unreachable_server_and_says_so(tmp_path, caplog):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="web.app"):
        app = create_app(test_settings(url, data_dir=tmp_path))
    assert app is not None
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot reach Redis" in warning and "s3cret" not in warning


def test_web_checks_and_accepts_a_real_external_server(redis_url, tmp_path, redis_client):
    app = create_app(test_settings(redis_url, data_dir=tmp_path))
    assert app.test_client().get("/healthz").status_code == 200
    leftovers = [k for k in redis_client.scan_iter(match="*union-probe*")]
    assert leftovers == []
