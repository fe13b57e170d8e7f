"""The engine's registry heartbeat (against the in-memory broker; the Redis path runs in test_engine_cli.py) and
the one parser of SGLang's weight_version string (weights/version.py)."""

from __future__ import annotations

import logging
import time

import pytest

from broker.base import EngineInfo
from broker.factory import connect
from broker.settings import BrokerConfig
from rollout_server.engine.registry import Heartbeat
from weights.version import (
    INITIAL_POLICY_VERSION,
    WeightVersionError,
    format_weight_version,
    parse_weight_version,
)


def _wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_heartbeat_refreshes_info_and_deregisters_on_stop() -> None:
    """Guards against a registry entry that never updates its policy version, expires while the engine
    lives, or stays behind after the engine stops."""
    broker = connect(BrokerConfig(redis_url="memory://engine-heartbeat", run_id="hb"))
    version = {"v": "default"}

    def info() -> EngineInfo:
        return EngineInfo(
            engine_id="e1", url="http://127.0.0.1:1", policy_version=parse_weight_version(version["v"], 0)
        )

    beat = Heartbeat(broker.engines, info, interval_s=0.05, ttl_s=0.3)
    beat.start()
    try:
        assert [e.policy_version for e in broker.engines.live()] == [0]  # "default": the start-up weights
        version["v"] = "4"
        time.sleep(0.5)  # longer than the ttl: only the heartbeat keeps it alive
        assert [(e.engine_id, e.policy_version) for e in broker.engines.live()] == [("e1", 4)]
    finally:
        beat.stop()
    assert broker.engines.live() == []
    with pytest.raises(ValueError, match="heartbeat_ttl_s"):
        Heartbeat(broker.engines, info, interval_s=1.0, ttl_s=1.0)
    broker.close()


def test_heartbeat_survives_a_version_that_names_no_policy_version(caplog: pytest.LogCaptureFixture) -> None:
    """Guards against a weight_version like "²" (str.isdigit() is true, int() refuses it) killing the heartbeat
    thread: the engine would silently leave the registry for good. The bad beats are skipped and logged once;
    the engine is back with the first good beat."""
    broker = connect(BrokerConfig(redis_url="memory://engine-heartbeat-bad", run_id="hb"))
    version = {"v": "3"}

    def info() -> EngineInfo:
        return EngineInfo(
            engine_id="e1", url="http://127.0.0.1:1", policy_version=parse_weight_version(version["v"], 0)
        )

    beat = Heartbeat(broker.engines, info, interval_s=0.05, ttl_s=0.3)
    beat.start()
    try:
        with caplog.at_level(logging.WARNING, logger="rollout_server.engine.registry"):
            version["v"] = "²"
            _wait_for(lambda: broker.engines.live() == [])  # skipped beats: it expires after the ttl
            assert beat.alive
        warnings = [r.getMessage() for r in caplog.records if "heartbeat failed" in r.getMessage()]
        assert len(warnings) == 1 and "'²'" in warnings[0], warnings
        version["v"] = "5"
        _wait_for(lambda: [e.policy_version for e in broker.engines.live()] == [5])
    finally:
        beat.stop()
    broker.close()


@pytest.mark.parametrize("raw", ["²", "٣", "-1", "+5", " 5", "5 ", "", "v3", "1e3", "3.0", "0x10", "9" * 19, "DEFAULT"])
def test_weight_version_parser_is_strict(raw: str) -> None:
    """Guards against a weight_version that `str.isdigit` accepts but `int` refuses or reads as another number
    ("²", Arabic-Indic digits), signs, spaces and overflowing values passing as policy versions: one clear error
    naming the value, never a crash somewhere downstream."""
    with pytest.raises(WeightVersionError, match="is not a policy version") as e:
        parse_weight_version(raw, INITIAL_POLICY_VERSION)
    assert repr(raw[:40]) in str(e.value)


def test_weight_version_default_means_the_start_version_and_round_trips() -> None:
    """Guards against SGLang's "default" meaning different versions to different readers (it was 0, -1 or None):
    it is the version the caller says the engine started at; digits read back what format writes."""
    assert parse_weight_version("default", 0) == 0 and parse_weight_version("default", 7) == 7
    assert parse_weight_version("12", 7) == 12 and parse_weight_version("007", 0) == 7
    assert all(parse_weight_version(format_weight_version(v), 0) == v for v in (0, 1, 10**17))
    with pytest.raises(WeightVersionError, match="negative"):
        format_weight_version(-1)
