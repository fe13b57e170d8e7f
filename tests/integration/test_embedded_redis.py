"""Embedded redis-server (broker/embedded.py) started the way `longtrace up` starts it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from broker.embedded import EmbeddedRedis


def test_relative_data_dir_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against `make demo` failing at start: it passes a relative run directory, and redis-server changes
    into --dir before opening its --logfile, so a relative data dir made it exit at once with an empty log."""
    monkeypatch.chdir(tmp_path)
    with EmbeddedRedis(data_dir=os.path.join("runs", "demo", "redis"), appendonly=True) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
    assert (tmp_path / "runs" / "demo" / "redis" / "redis.log").exists()


def test_append_only_file_is_on_by_default(tmp_path: Path) -> None:
    """Guards against an embedded Redis that loses the run in a restart by default (issue 19): without the
    append-only file (and with `--save ""`) redis-server comes back empty."""
    with EmbeddedRedis(data_dir=tmp_path) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5, decode_responses=True)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        client.close()
