"""The engine's registry heartbeat (against the in-memory broker; the Redis path runs in test_engine_cli.py)."""

from __future__ import annotations

import time

import pytest

from broker.base import EngineInfo
from broker.factory import connect
from broker.settings import BrokerConfig
from rollout_server.engine.registry import Heartbeat, version_number


def test_heartbeat_refreshes_info_and_deregisters_on_stop() -> None:
    """Guards against a registry entry that never updates its weight version, expires while the engine
    lives, or stays behind after the engine stops."""
    broker = connect(BrokerConfig(redis_url="memory://engine-heartbeat", run_id="hb"))
    version = {"v": "default"}

    def info() -> EngineInfo:
        return EngineInfo(engine_id="e1", url="http://127.0.0.1:1", weight_version=version_number(version["v"]))

    beat = Heartbeat(broker.engines, info, interval_s=0.05, ttl_s=0.3)
    beat.start()
    try:
        assert [e.weight_version for e in broker.engines.live()] == [-1]
        version["v"] = "4"
        time.sleep(0.5)  # longer than the ttl: only the heartbeat keeps it alive
        assert [(e.engine_id, e.weight_version) for e in broker.engines.live()] == [("e1", 4)]
    finally:
        beat.stop()
    assert broker.engines.live() == []
    with pytest.raises(ValueError, match="heartbeat_ttl_s"):
        Heartbeat(broker.engines, info, interval_s=1.0, ttl_s=1.0)
    broker.close()


def test_version_number_maps_sglang_strings() -> None:
    """Guards against a non-numeric SGLang weight_version ("default") crashing the heartbeat."""
    assert (version_number("default"), version_number("12"), version_number("-1")) == (-1, 12, -1)
