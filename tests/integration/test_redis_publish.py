"""The Redis producer's one-round-trip publish (a WATCH, a check script and a MULTI per message) and its reused
encoding buffers, on a real redis-server."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis
from redis.connection import PythonRespSerializer

from broker.base import ROLLOUTS, TASKS, BackpressureTimeout
from broker.redis import FIELD, RedisBroker
from broker.redis.producer import RedisProducer
from broker.redis.scripts import PUBLISH_CHECK
from broker.schemas import Group, Task, decode
from broker.settings import BrokerConfig
from tests.helpers.broker_contract import make_rollout, make_task


@pytest.fixture
def make_broker(redis_url: str) -> Iterator[Callable[..., RedisBroker]]:
    run_id = f"p-{uuid.uuid4().hex[:8]}"
    made: list[RedisBroker] = []

    def make(**overrides: Any) -> RedisBroker:
        config = {"redis_url": redis_url, "socket_timeout_s": 5.0, "run_id": run_id, **overrides}
        made.append(RedisBroker(BrokerConfig.model_validate(config)))
        return made[-1]

    yield make
    for broker in made:
        broker.close()


def _stream(broker: RedisBroker) -> list[Group]:
    """The messages in the rollouts stream, in order."""
    return [decode(f[FIELD], Group) for _, f in broker.client.xrange(broker.key(ROLLOUTS))]


def _only_at_once(producer: RedisProducer[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the two-round-trip path fail, so that a test sees the one-round-trip path alone."""

    def checked(*args: Any) -> Any:
        raise AssertionError("the two-round-trip path ran")

    monkeypatch.setattr(producer, "_publish_checked", checked)


def _leftover_guards(broker: RedisBroker) -> list[Any]:
    return list(broker.client.scan_iter(match=broker.key("publish-guard:*"), count=1000))


def test_one_round_trip_publish_skips_duplicates_and_keeps_order(
    make_broker: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the check script's refusal of a duplicate not aborting its EXEC (the message twice: Redis
    must abort a transaction whose own connection wrote a watched key), against a duplicate stopping the
    messages after it, and against guard keys left behind."""
    broker = make_broker()
    producer = broker.producer(ROLLOUTS, Group)
    assert isinstance(producer, RedisProducer)
    _only_at_once(producer, monkeypatch)
    msgs = [make_rollout(i) for i in range(6)]
    first = producer.publish([msgs[1], msgs[3]], dedup_key=lambda g: g.group_id)
    ids = producer.publish(msgs, dedup_key=lambda g: g.group_id)
    assert ids[1] is None and ids[3] is None
    assert all(ids[i] is not None for i in (0, 2, 4, 5))
    assert [g.task.group_id for g in _stream(broker)] == ["g1", "g3", "g0", "g2", "g4", "g5"]
    assert [i for i in first + ids if i is not None] == [
        i.decode() for i, _ in broker.client.xrange(broker.key(ROLLOUTS))
    ]
    assert _leftover_guards(broker) == []


def test_one_round_trip_publish_stops_at_the_backlog_limit_in_order(
    make_broker: Callable[..., RedisBroker],
) -> None:
    """Guards against the one-round-trip path overshooting max_backlog, or adding a message after one that found
    the stream full (out of order), and against it sending payloads again while the stream stays full."""
    broker = make_broker(max_backlog=3)
    producer = broker.producer(ROLLOUTS, Group)
    assert isinstance(producer, RedisProducer)
    msgs = [make_rollout(i) for i in range(5)]
    with pytest.raises(BackpressureTimeout):
        producer.publish(msgs, dedup_key=lambda g: g.group_id, timeout_s=0.2)
    assert [g.task.group_id for g in _stream(broker)] == ["g0", "g1", "g2"]
    assert producer._at_once is False  # the next attempt looks first
    assert _leftover_guards(broker) == []
    broker.consumer(ROLLOUTS, Group, "g", "c").read(3, block_s=0)  # held entries do not count: room again
    ids = producer.publish(msgs, dedup_key=lambda g: g.group_id)
    assert ids[:3] == [None] * 3 and None not in ids[3:]
    assert [g.task.group_id for g in _stream(broker)] == [f"g{i}" for i in range(5)]


def test_publish_check_verdicts(redis_url: str) -> None:
    """Guards against the check script letting through a message it must refuse: a duplicate, one after a stop,
    one whose predecessor was neither added nor already there (a concurrent write aborted it), one over the
    backlog limit; and against a refusal of a duplicate stopping the rest."""
    c = redis.Redis.from_url(redis_url)
    p = f"check-{uuid.uuid4().hex[:8]}:"
    stop, skip, stream, key, prev = (p + n for n in ("stop", "skip", "stream", "key", "prev"))

    def check(*keys: str, max_backlog: int = 10) -> Any:
        return c.eval(PUBLISH_CHECK.source, 3 + len(keys), stop, skip, stream, *keys, max_backlog)

    try:
        assert check() == 1 and check(key) == 1
        c.set(prev, 1)
        assert check(key, prev) == 1
        c.set(key, 1)
        assert check(key, prev) == 0 and not c.exists(stop, skip)  # a duplicate skips itself only
        c.delete(key, prev)
        assert check(key, prev) == -1 and c.exists(stop)  # predecessor missing: stop
        assert check() == -1  # stopped: every later message too
        c.delete(stop)
        c.xadd(stream, {"d": b"x"})
        assert check(max_backlog=2) == 1 and check(max_backlog=1) == -1
    finally:
        c.delete(stop, skip, stream, key, prev)
        c.close()


def test_reused_encoding_buffers_never_change_a_published_message(make_broker: Callable[..., RedisBroker]) -> None:
    """Guards against the producer's reused encoding buffers changing what it published before (a buffer written
    while redis-py still held it, or shared between threads), and against the pure-Python command packer (which
    sends them without a copy) being replaced by hiredis's."""
    broker = make_broker()
    packer = broker.client.connection_pool.connection_kwargs["command_packer"]
    assert isinstance(packer, PythonRespSerializer)
    producer = broker.producer(ROLLOUTS, Group)
    big = [
        msgspec.structs.replace(m, samples=m.samples * 20) for m in (make_rollout(i) for i in range(3))
    ]  # larger than the next ones: the buffers shrink in place
    small = [make_rollout(i) for i in range(10, 14)]
    producer.publish(big)
    producer.publish(small)
    threads = [
        threading.Thread(target=producer.publish, args=([make_rollout(100 * t + i) for i in range(5)],))
        for t in range(1, 4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = _stream(broker)
    assert got[:7] == big + small
    threaded = sorted(got[7:], key=lambda g: g.task.group_id)
    assert threaded == sorted(
        [make_rollout(100 * t + i) for t in range(1, 4) for i in range(5)], key=lambda g: g.task.group_id
    )


def test_a_bulk_of_small_messages_takes_the_two_round_trip_path(
    make_broker: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a bulk publish of small messages (the feeder's tasks) paying the per-message check script
    (~30 us of Redis time each) where one check and one MULTI cost less."""
    broker = make_broker()
    producer = broker.producer(TASKS, Task)
    assert isinstance(producer, RedisProducer)

    def at_once(*args: Any) -> Any:
        raise AssertionError("the one-round-trip path ran")

    monkeypatch.setattr(producer, "_publish_at_once", at_once)
    ids = producer.publish([make_task(i) for i in range(40)], dedup_key=lambda t: t.group_id)
    assert None not in ids and broker.client.xlen(broker.key(TASKS)) == 40
