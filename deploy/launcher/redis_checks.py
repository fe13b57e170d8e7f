"""What `longtrace up` checks on its Redis before and while it runs: a given Redis is reachable, keeps what a run
writes (no evicting `maxmemory-policy`; `appendonly no` is a warning) and holds none of the run's namespaces; each
phase's run marker is written before any of its services attaches (`Broker.attach_run`), so a Redis that later
loses the run's data stops every service with RunDataLost instead of looking like an empty run."""

from __future__ import annotations

from collections.abc import Sequence

from broker.base import BrokerError
from broker.redis import RedisBroker
from broker.settings import BrokerConfig, BrokerRetryConfig
from common.config import ConfigError


def _connect(redis_url: str, run_id: str) -> RedisBroker:
    try:  # a wrong URL fails in seconds, not after the services' minute of retries
        retry = BrokerRetryConfig(max_attempts=2, deadline_s=10.0)
        return RedisBroker(BrokerConfig(redis_url=redis_url, run_id=run_id, retry=retry))
    except BrokerError as e:
        raise ConfigError(f"--redis.url: {e}") from e


def check_durability(redis_url: str, run_id: str) -> list[str]:
    """Warnings about what a restart of the server would lose; ConfigError when it may evict the run's keys."""
    broker = _connect(redis_url, run_id)
    try:
        return broker.check_durability()
    except BrokerError as e:
        raise ConfigError(f"--redis.url: {e}") from e
    finally:
        broker.close()


def check_given_redis(redis_url: str, run_ids: Sequence[str], run_id_flag: str) -> list[str]:
    """A Redis given with --redis.url: durable enough (warnings returned), and none of `run_ids` in use."""
    warnings = check_durability(redis_url, run_ids[0])
    for rid in run_ids:
        broker = _connect(redis_url, rid)
        try:
            # Group ids are deduplicated per namespace for days: a reused namespace would publish nothing.
            used = broker.holds_keys()
        finally:
            broker.close()
        if used:
            raise ConfigError(f"--run_id {run_id_flag}: Redis at --redis.url already holds run {rid!r}")
    return warnings


def start_run(redis_url: str, run_id: str) -> None:
    """Write the run's marker (the launcher owns the run of each phase)."""
    broker = _connect(redis_url, run_id)
    try:
        broker.attach_run("longtrace up", owner=True)
    finally:
        broker.close()
