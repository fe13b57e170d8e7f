"""The broker contract on a real redis-server, plus what only Redis has: crashes, restarts, memory, auth, CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.base import ROLLOUTS, SCORED, TASKS, BackpressureTimeout, Broker, BrokerError
from broker.embedded import EmbeddedRedis
from broker.factory import connect
from broker.redis import RedisBroker
from broker.schemas import Group, SampleReward, ScoredGroup, Task
from broker.settings import BrokerConfig
from common.config import ConfigError
from common.net import free_port
from tests.helpers.broker_contract import *  # noqa: F403
from tests.helpers.broker_contract import _collect, make_rollout, make_task

REPO = Path(__file__).resolve().parents[2]


def _config(url: str, **overrides: Any) -> BrokerConfig:
    return BrokerConfig.model_validate({"redis_url": url, "socket_timeout_s": 5.0, **overrides})


@pytest.fixture
def make_broker(redis_url: str) -> Iterator[Callable[..., Broker]]:
    """RedisBrokers of one run (a fresh run id per test) on the session's redis-server."""
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    made: list[Broker] = []

    def make(**overrides: Any) -> Broker:
        broker = connect(_config(redis_url, **{"run_id": run_id, **overrides}))
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def test_keys_are_namespaced_by_run_with_a_hash_tag(make_broker: Callable[..., Broker], redis_url: str) -> None:
    """Guards against keys outside `longtrace:{run}:` (runs would collide; a cluster would split a run's keys)."""
    broker = make_broker(run_id="ns")
    broker.producer(ROLLOUTS, Group).publish([make_rollout(1)], dedup_key=lambda g: g.group_id)
    broker.consumer(ROLLOUTS, Group, "reward", "w").read(1, block_s=0)
    broker.policy_version.set(1)
    broker.state.set("a", "b")
    keys = sorted(
        k.decode() if isinstance(k, bytes) else k for k in redis.Redis.from_url(redis_url, socket_timeout=5).keys("*")
    )
    assert keys and all(k.startswith("longtrace:{ns}:") for k in keys), keys


def test_holds_keys_sees_only_its_own_run(redis_url: str) -> None:
    """Guards against `longtrace up --redis.url` reusing a run id whose group ids are still deduplicated (it would
    publish nothing), and against a run id with glob characters (`a*`) counting another run's keys as its own."""
    other = RedisBroker(_config(redis_url, run_id="a-other"))
    reused = RedisBroker(_config(redis_url, run_id="a*"))
    try:
        assert not other.holds_keys() and not reused.holds_keys()
        other.state.set("status", "running")
        assert other.holds_keys() and not reused.holds_keys()
        reused.producer(TASKS, Task).publish([make_task(1)], dedup_key=lambda t: t.group_id)
        assert reused.holds_keys()
    finally:
        other.close()
        reused.close()


_KILLED_CONSUMER = textwrap.dedent(
    """
    import sys, time
    from broker.factory import connect
    from broker.settings import BrokerConfig
    from broker.base import ROLLOUTS, SCORED
    from broker.schemas import Group, SampleReward, ScoredGroup
    broker = connect(BrokerConfig.model_validate({"redis_url": sys.argv[1], "run_id": sys.argv[2]}))
    consumer = broker.consumer(ROLLOUTS, Group, "reward", "doomed")
    entries = []
    while len(entries) < 6:
        entries += consumer.read(6 - len(entries), block_s=1.0)
    reward = SampleReward(reward=1.0, outcome_reward=1.0, rubric_reward=1.0)
    out = [ScoredGroup(group=e.msg, rewards=[reward, reward]) for e in entries[:3]]
    broker.producer(SCORED, ScoredGroup).publish(out, dedup_key=lambda s: s.group_id)
    print("published 3 of 6, not acked", flush=True)
    time.sleep(60)
    """
)


def test_consumer_killed_mid_batch_is_reclaimed_nothing_lost_or_doubled(redis_url: str) -> None:
    """Guards against losing a SIGKILLed consumer's pending entries, or scoring its half-done work twice."""
    run_id = f"kill-{uuid.uuid4().hex[:6]}"
    broker = RedisBroker(_config(redis_url, run_id=run_id, claim_idle_s=0.3))
    broker.producer(ROLLOUTS, Group).publish([make_rollout(i) for i in range(8)])
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CONSUMER, redis_url, run_id], stdout=subprocess.PIPE, cwd=REPO, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("published 3 of 6")
    finally:
        proc.kill()  # SIGKILL after reading and before acking
        proc.wait(10)
    survivor = broker.consumer(ROLLOUTS, Group, "reward", "survivor")
    scored = broker.producer(SCORED, ScoredGroup)
    reward = SampleReward(reward=1.0, outcome_reward=1.0, rubric_reward=1.0)
    handled: list[tuple[str, int]] = []
    deadline = time.monotonic() + 10
    while len(handled) < 8 and time.monotonic() < deadline:
        entries = survivor.read(4, block_s=0.5)
        scored.publish(
            [ScoredGroup(group=e.msg, rewards=[reward, reward]) for e in entries], dedup_key=lambda s: s.group_id
        )
        survivor.ack([e.id for e in entries])
        handled += [(e.msg.group_id, e.delivery_count) for e in entries]
    assert sorted(g for g, _ in handled) == sorted(f"g{i}" for i in range(8))
    assert sorted(n for _, n in handled) == [1, 1] + [2] * 6  # the six the dead consumer held were redelivered
    assert broker.producer(ROLLOUTS, Group).backlog() == 0
    out = _collect(broker.consumer(SCORED, ScoredGroup, "learner", "l"))
    assert sorted(s.msg.group_id for s in out) == sorted(f"g{i}" for i in range(8))  # each exactly once
    broker.close()


def test_backpressure_keeps_redis_memory_flat(redis_url: str) -> None:
    """Guards against a producer that keeps writing into Redis when no one consumes (memory would grow unbounded)."""
    broker = RedisBroker(_config(redis_url, run_id="mem", max_backlog=4))
    producer = broker.producer(ROLLOUTS, Group)
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    big = [make_rollout(i) for i in range(12)]
    for g in big:  # 64K prompt tokens each: 256 KB, so growth would show
        g.task.prompt_ids = b"\x01" * (256 * 1024)
    producer.publish(big[:4])
    used_before = int(client.info("memory")["used_memory"])
    for i in range(4, 12):
        with pytest.raises(BackpressureTimeout):
            producer.publish([big[i]], timeout_s=0.05)
    used_after = int(client.info("memory")["used_memory"])
    assert producer.backlog() == 4
    assert used_after - used_before < 256 * 1024, (used_before, used_after)
    broker.close()
    client.close()


def test_redis_killed_and_restarted_with_aof_loses_nothing(tmp_path: Path) -> None:
    """Guards against losing published-but-unacked entries (or the consumer's pending list) in a Redis crash,
    and against producers and consumers that do not reconnect after Redis comes back."""
    port = free_port()
    server = EmbeddedRedis(port=port, data_dir=tmp_path, appendonly=True).start()
    try:
        config = _config(server.url, run_id="aof", retry={"max_attempts": 100, "deadline_s": 20}, claim_idle_s=3600)
        broker = RedisBroker(config)
        producer = broker.producer(TASKS, Task)
        consumer = broker.consumer(TASKS, Task, "g", "c")
        producer.publish([make_task(i) for i in range(10)])
        acked = consumer.read(3, block_s=1)
        consumer.ack([e.id for e in acked])
        held = consumer.read(3, block_s=1)  # pending in this consumer when Redis dies
        server.kill()
        restarter = threading.Timer(0.5, server.start)
        restarter.start()
        producer.publish([make_task(i) for i in range(10, 12)])  # retries until Redis is back
        restarter.join()
        assert producer.backlog() == 9  # 4 unread + 3 pending + 2 new; the 3 acked stay gone
        restarted = RedisBroker(config).consumer(TASKS, Task, "g", "c")
        again = restarted.read(10, block_s=1)
        assert [e.id for e in again] == [e.id for e in held] and all(e.delivery_count == 2 for e in again)
        rest = consumer.read(10, block_s=1)  # the old consumer object reconnects too
        assert sorted(e.msg.group_id for e in rest) == sorted(f"g{i}" for i in (6, 7, 8, 9, 10, 11))
        broker.close()
    finally:
        server.cleanup()


def test_password_url_works_and_a_wrong_password_fails_fast() -> None:
    """Guards against URLs with credentials being ignored, and bad credentials retried for a minute."""
    with EmbeddedRedis(password="s3cret") as server:
        assert server.url.startswith("redis://:s3cret@")
        broker = connect(_config(server.url, run_id="auth"))
        broker.producer(TASKS, Task).publish([make_task(1)])
        assert broker.consumer(TASKS, Task, "g", "c").read(1, block_s=1)[0].msg == make_task(1)
        broker.close()
        start = time.monotonic()
        with pytest.raises(BrokerError, match="refused the credentials"):
            connect(_config(server.url.replace("s3cret", "wrong"), run_id="auth"))
        assert time.monotonic() - start < 5, "bad credentials were retried"
        with pytest.raises(ValueError, match="--broker.redis_url"):
            connect(_config("http://localhost:6379"))


def test_password_from_a_file_or_the_environment_and_never_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards against the Redis password having to sit in the URL (argv of every service, visible to any local
    user through ps), against a missing file or a doubly given password being silently ignored, and against log
    lines and errors that print the URL with its password."""
    password = "pw-9c2e7d41b0"  # a distinctive string to grep logs for
    monkeypatch.delenv("LONGTRACE_REDIS_PASSWORD", raising=False)
    with EmbeddedRedis(password=password) as server:
        bare = f"redis://{server.host}:{server.port}/0"
        secret = tmp_path / "redis-password"
        secret.write_text(password + "\n")
        from_file = connect(_config(bare, run_id="pw", redis_password_file=str(secret)))
        from_file.producer(TASKS, Task).publish([make_task(1)])
        from_file.close()
        monkeypatch.setenv("LONGTRACE_REDIS_PASSWORD", password)
        from_env = connect(_config(bare, run_id="pw"))
        assert from_env.consumer(TASKS, Task, "g", "c").read(1, block_s=1)[0].msg == make_task(1)
        from_env.close()
        with pytest.raises(ConfigError, match="set it in one place"):
            connect(_config(server.url, run_id="pw"))
        monkeypatch.delenv("LONGTRACE_REDIS_PASSWORD")
        with pytest.raises(ConfigError, match="--broker.redis_password_file: no such file"):
            connect(_config(bare, run_id="pw", redis_password_file=str(tmp_path / "missing")))
        with pytest.raises(BrokerError, match="refused the credentials") as refused:
            connect(_config(server.url.replace(password, "wrong-" + password), run_id="pw"))
        assert password not in str(refused.value)
    # Redis gone: every retry logs a warning naming the URL, and the final error names it too.
    with caplog.at_level(logging.DEBUG), pytest.raises(BrokerError) as lost:
        connect(_config(server.url, run_id="pw", retry={"max_attempts": 2, "deadline_s": 5}, connect_timeout_s=1))
    assert "failed (attempt 1/2)" in caplog.text and f"{server.host}:{server.port}" in caplog.text
    assert password not in caplog.text and password not in str(lost.value)


def test_longtrace_redis_prints_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Guards against `longtrace redis` not printing a usable URL (its password masked: scripts log stdout),
    leaving redis-server behind on SIGTERM, or starting without its append-only file unless told (a restart would
    then come back empty)."""
    env = {**os.environ, "LT_TEST_REDIS_PW": "pw1"}
    cmd = [sys.executable, "-m", "deploy.cli", "redis", "--dir", str(tmp_path), "--password-env", "LT_TEST_REDIS_PW"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env=env, text=True)
    try:
        assert proc.stdout is not None
        printed = proc.stdout.readline().strip()
        assert printed.startswith("redis://:***@127.0.0.1:") and "pw1" not in printed  # the password stays out of logs
        url = printed.replace(":***@", ":pw1@")
        client = redis.Redis.from_url(url, socket_timeout=5)
        assert client.ping() and client.config_get("appendonly")["appendonly"] == "yes"
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()


def test_bench_broker_prints_one_json_object(redis_server: str) -> None:
    """Guards against a benchmark that rots (crashes, or drops the keys the targets are read from)."""
    cmd = [
        sys.executable, "-m", "deploy.cli", "bench", "broker", "--json", "--redis-url", redis_server,
        "--prompt-tokens", "512", "--response-tokens", "64", "--num-samples", "2", "--num-groups", "8", "--reps", "2",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    result = json.loads(out)
    for key in (
        "groups_per_s",
        "raw_groups_per_s",
        "raw_bytes_groups_per_s",
        "ratio",
        "ratio_bytes",
        "mb_per_s",
        "encode_us",
        "decode_us",
        "json_encode_us",
        "json_ratio",
        "group_mb",
    ):
        assert result[key] > 0, key
    assert redis.Redis.from_url(redis_server, socket_timeout=5).keys("longtrace:{bench-*") == []  # cleaned up
