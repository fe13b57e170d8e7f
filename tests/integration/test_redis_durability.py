"""A Redis that lost a run's data, or may lose it, is named: the run marker (`Broker.attach_run`) and the server's
durability settings (`Broker.check_durability`), against real redis-servers started with those settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.base import Broker, BrokerError, RunDataLost
from broker.embedded import EmbeddedRedis
from broker.factory import connect
from broker.settings import BrokerConfig
from common.config import ConfigError, load_config
from deploy.launcher.config import UpConfig
from deploy.launcher.dashboard import Dashboard
from deploy.launcher.rundir import RunDir
from deploy.launcher.up import Launcher

ROOT = Path(__file__).resolve().parents[2]
UP_CONFIG = ROOT / "configs" / "debug" / "up.toml"
RUN = "durable"


def _broker(url: str, run_id: str = RUN) -> Broker:
    return connect(BrokerConfig(redis_url=url, run_id=run_id, socket_timeout_s=2.0, connect_timeout_s=1.0))


def _until_raises(fn: object, timeout_s: float = 5.0) -> RunDataLost:
    """Call `fn` until it raises RunDataLost (an attached broker checks the marker about once a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fn()  # type: ignore[operator]
        except RunDataLost as e:
            return e
        assert time.monotonic() < deadline, "no RunDataLost: the lost run was taken for an empty one"
        time.sleep(0.1)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[EmbeddedRedis]]:
    started: list[EmbeddedRedis] = []
    yield started
    for s in started:
        s.cleanup()


def _start(servers: list[EmbeddedRedis], **kw: object) -> EmbeddedRedis:
    server = EmbeddedRedis(**kw).start()  # type: ignore[arg-type]
    servers.append(server)
    return server


def test_a_redis_restarted_without_its_data_stops_every_attached_service(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    """Guards against a Redis restarted without its append-only file being taken for an empty run: redis-py
    reconnects silently, the policy version reads 0, the streams are empty and the learner waits hours for groups
    it admitted. Every attached service, the owner and a worker that joined before the owner wrote the marker,
    stops with an error naming the Redis and the run."""
    first = _start(servers, data_dir=tmp_path / "r", appendonly=False)
    worker = _broker(first.url)
    assert worker.attach_run("rollout worker") is None  # before the run started: it adopts the marker later
    learner = _broker(first.url)
    marker = learner.attach_run("learner", owner=True)
    assert marker is not None and marker.run_id == RUN and marker.started_by == "learner"
    learner.state.set("admitted", "8")
    learner.policy_version.set(3)
    time.sleep(1.2)  # the worker's next call adopts the learner's marker
    assert worker.policy_version.get() == 3 and worker.engines.live() == []

    first.stop()  # a crash of redis-server and a restart without the append-only file: it comes back empty
    _start(servers, port=first.port, data_dir=tmp_path / "r", appendonly=False)
    for broker in (learner, worker):
        lost = _until_raises(broker.policy_version.get)
        assert f"127.0.0.1:{first.port}" in str(lost) and f"run {RUN!r} started at" in str(lost), lost
        assert "by learner" in str(lost) and "no marker" in str(lost) and "append-only file" in str(lost)
        with pytest.raises(RunDataLost):  # it stays stopped, every call
            broker.state.set("admitted", "9")
        broker.close()


def test_a_new_start_after_the_loss_is_not_taken_for_the_old_run(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    """Guards against a service that restarted on the emptied Redis writing a new marker which the services still
    attached to the old run would accept: they compare the whole marker, not its presence."""
    first = _start(servers, data_dir=tmp_path / "r", appendonly=False)
    old = _broker(first.url)
    old.attach_run("longtrace up", owner=True)
    first.stop()
    _start(servers, port=first.port, data_dir=tmp_path / "r", appendonly=False)
    again = _broker(first.url)
    assert again.attach_run("learner", owner=True) is not None  # no checkpoint: a fresh start is legitimate
    lost = _until_raises(old.policy_version.get)
    assert "another start" in str(lost) and "by learner" in str(lost), lost
    old.close()
    again.close()


def test_with_the_append_only_file_a_restart_keeps_the_run(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    """Guards against the marker check failing a run whose Redis restarted from its append-only file."""
    first = _start(servers, data_dir=tmp_path / "r", appendfsync="always")
    broker = _broker(first.url)
    broker.attach_run("learner", owner=True)
    broker.policy_version.set(5)
    first.kill()
    _start(servers, port=first.port, data_dir=tmp_path / "r", appendfsync="always")
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert broker.policy_version.get() == 5
        time.sleep(0.1)
    broker.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_resumed_service_refuses_a_store_without_the_run(backend: str, redis_url: str) -> None:
    """Guards against a learner resuming from its checkpoint on a Redis that no longer holds the run (restarted
    without its append-only file): it would republish nothing (its cursor is past the tasks) and wait for groups
    that no longer exist. The error names the Redis, the run and what says the run existed."""
    broker = _broker("memory://" if backend == "memory" else redis_url)
    with pytest.raises(RunDataLost) as lost:
        broker.attach_run("learner", owner=True, resumed_from="checkpoint at step 12")
    assert f"run {RUN!r} (checkpoint at step 12 says it started before)" in str(lost.value)
    assert ("memory://" if backend == "memory" else "127.0.0.1") in str(lost.value)
    marker = broker.attach_run("learner", owner=True)
    assert marker is not None
    assert broker.attach_run("learner", owner=True, resumed_from="checkpoint at step 12") == marker
    assert broker.attach_run("rollout worker") == marker
    assert broker.check_durability() == []
    broker.close()


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "volatile-ttl"])
def test_an_evicting_redis_is_refused(policy: str, tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    """Guards against running on a Redis that evicts keys under memory pressure: volatile-* drops the dedup keys
    (groups published twice), allkeys-* any key (queued groups, the run marker)."""
    server = _start(servers, data_dir=tmp_path / "r", settings={"maxmemory-policy": policy, "maxmemory": "64mb"})
    broker = _broker(server.url)
    for check in (broker.check_durability, lambda: broker.attach_run("learner", owner=True)):
        with pytest.raises(BrokerError, match=f"maxmemory-policy {policy}.*noeviction"):
            check()
    broker.close()


def test_durability_warnings_name_the_setting(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    """Guards against a Redis without an append-only file, or a managed one that refuses CONFIG GET, passing
    unnoticed: a warning names the setting (or what could not be checked); a durable Redis gets none."""
    durable = _broker(_start(servers, data_dir=tmp_path / "a").url)
    assert durable.check_durability() == []
    volatile = _broker(_start(servers, data_dir=tmp_path / "b", appendonly=False).url)
    assert [w for w in volatile.check_durability() if "appendonly no" in w and "appendonly yes" in w]
    lazy = _broker(_start(servers, data_dir=tmp_path / "c", appendfsync="no").url)
    assert [w for w in lazy.check_durability() if "appendfsync no" in w]
    managed = _start(servers, data_dir=tmp_path / "d", settings={"rename-command": ["CONFIG", ""]})
    warnings = _broker(managed.url).check_durability()
    assert len(warnings) == 1 and "could not check appendonly" in warnings[0] and "noeviction" in warnings[0]
    for b in (durable, volatile, lazy):
        b.close()


def test_launcher_refuses_an_evicting_redis_and_marks_each_phase(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    """Guards against `longtrace up` starting a run on a given Redis that evicts keys (a ConfigError naming
    --redis.url), against its embedded Redis running without the append-only file by default, and against a phase
    whose services start before its run marker exists."""
    evicting = _start(servers, data_dir=tmp_path / "e", settings={"maxmemory-policy": "allkeys-lru"})
    run = tmp_path / "run"
    cfg = load_config(UpConfig, UP_CONFIG, ["--redis.url", evicting.url, "--run_dir", str(run)])
    with pytest.raises(ConfigError, match="--redis.url: .*maxmemory-policy allkeys-lru"):
        Launcher(cfg, Dashboard(RunDir.at(run), "off")).start_redis()

    cfg = load_config(UpConfig, UP_CONFIG, ["--run_dir", str(run)])
    launcher = Launcher(cfg, Dashboard(RunDir.at(run), "off"))
    try:
        launcher.start_redis()
        client = redis.Redis.from_url(launcher.redis_url, socket_timeout=5, decode_responses=True)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        from deploy.launcher.redis_checks import start_run

        phase = next(iter(cfg.phases))
        start_run(launcher.redis_url, cfg.phase_run_id(phase))
        broker = _broker(launcher.redis_url, cfg.phase_run_id(phase))
        marker = broker.attach_run("learner", owner=True, resumed_from="checkpoint at step 1")
        assert marker is not None and marker.started_by == "longtrace up"
        broker.close()
        client.close()
    finally:
        launcher.sup.stop_all(30)
