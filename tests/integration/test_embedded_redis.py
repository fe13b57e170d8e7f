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
