"""Dead letters name their group and the dead stream is capped, alike in both backends (in-process, and a real
redis-server)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis

from broker.base import DEAD, ROLLOUTS, TASKS, Broker
from broker.entries import group_id_of
from broker.factory import connect
from broker.memory import MemoryBroker, MemoryStore
from broker.redis.layout import Keys
from broker.schemas import DeadLetter, Group, ScoredGroup, Task, encode
from broker.settings import BrokerConfig
from tests.helpers.broker_contract import make_rollout, make_task

MakeBroker = Callable[..., Broker]


@pytest.fixture(params=["memory", "redis"])
def make_broker(request: pytest.FixtureRequest) -> Iterator[MakeBroker]:
    """Brokers of one run over one store: a MemoryStore, or the session's redis-server (a fresh run id)."""
    run_id = f"dead-{uuid.uuid4().hex[:8]}"
    made: list[Broker] = []
    store = MemoryStore()

    def make(**overrides: Any) -> Broker:
        if request.param == "memory":
            broker: Broker = MemoryBroker(BrokerConfig(redis_url="memory://", run_id=run_id, **overrides), store)
        else:
            url = request.getfixturevalue("redis_url")
            broker = connect(BrokerConfig(redis_url=url, run_id=run_id, socket_timeout_s=5, **overrides))
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


def _letters(broker: Broker) -> list[DeadLetter]:
    return [e.msg for e in broker.view(DEAD).peek(DeadLetter, count=1000).entries]


def test_dead_letters_name_the_group_of_the_entry(make_broker: MakeBroker) -> None:
    """Guards against a dead letter that does not say which group died (the learner could not give the group's
    admission slot back, and the run could not finish): an application's dead letter, an entry that does not
    decode as its stream's message, and one buried after max_deliveries all name it."""
    broker = make_broker(max_deliveries=1)
    broker.producer(ROLLOUTS, Group).publish([make_rollout(1)])
    consumer = broker.consumer(ROLLOUTS, Group, "reward", "w")
    [entry] = consumer.read(1, block_s=1)
    consumer.dead_letter(entry, "judge failed after 3 attempts")
    broker.producer(ROLLOUTS, Task).publish([make_task(2)])  # a Task on the Group stream: undecodable
    assert consumer.read(1, block_s=0.2) == []
    broker.producer(TASKS, Task).publish([make_task(3)])
    for _ in range(2):  # delivered twice (a restart in between): over max_deliveries 1, buried by the second read
        make_broker(max_deliveries=1).consumer(TASKS, Task, "rollout", "crashy").read(1, block_s=0.2)
    letters = _letters(broker)
    assert [(d.stream, d.group_id) for d in letters] == [(ROLLOUTS, "g1"), (ROLLOUTS, "g2"), (TASKS, "g3")]
    assert letters[1].reason.startswith("undecodable") and letters[2].reason.startswith("delivered 2 times")


def test_group_id_is_read_from_any_message_and_empty_when_there_is_none() -> None:
    """Guards against the group id being lost for an entry of another schema version or with one malformed field
    (it still names its group), and against a crash on bytes that name none."""
    task = make_task(4)
    scored = ScoredGroup(group=make_rollout(5), rewards=[])
    assert group_id_of(encode(task)) == "g4" and group_id_of(encode(scored)) == "g5"
    assert group_id_of(encode(make_rollout(6))) == "g6"
    foreign = msgspec.msgpack.encode({"type": "task", "schema_version": 99, "group_id": "g7", "label": 3})
    assert group_id_of(foreign) == "g7"
    assert group_id_of(b"\xc1garbage") == "" and group_id_of(msgspec.msgpack.encode({"x": 1})) == ""


def test_an_entry_without_a_payload_gives_a_letter_without_a_group(redis_url: str) -> None:
    """Guards against a foreign producer's entry (no payload field) crashing the bury: its letter has no group."""
    run_id = f"dead-{uuid.uuid4().hex[:8]}"
    broker = connect(BrokerConfig(redis_url=redis_url, run_id=run_id, socket_timeout_s=5))
    consumer = broker.consumer(TASKS, Task, "rollout", "w")
    client = redis.Redis.from_url(redis_url)
    client.xadd(Keys(run_id).key(TASKS), {"other": "field"})
    client.close()
    assert consumer.read(1, block_s=0.2) == []
    [letter] = _letters(broker)
    assert letter.group_id == "" and letter.reason.startswith("undecodable")
    broker.close()


def test_the_dead_stream_is_capped_keeping_the_newest_letters(make_broker: MakeBroker) -> None:
    """Guards against the dead stream growing without bound (a judge down for hours dead-letters every group): past
    --broker.dead_max_entries the oldest letters are trimmed (approximately in Redis: whole nodes of ~100)."""
    broker = make_broker(dead_max_entries=10, max_backlog=1000)
    broker.producer(ROLLOUTS, Task).publish([make_task(i) for i in range(300)])  # all undecodable as Groups
    assert broker.consumer(ROLLOUTS, Group, "reward", "w").read(300, block_s=0.5) == []
    letters = _letters(broker)
    assert 10 <= len(letters) <= 10 + 100
    assert letters[-1].group_id == "g299"  # the newest are kept
    assert broker.view(DEAD).stats().length == len(letters)
