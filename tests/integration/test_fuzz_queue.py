"""Hostile queue entries on a real Redis: garbage bytes, valid msgpack of the wrong type or schema version, and
oversized groups in `rollouts` end in `dead` with the reason, and the reward worker keeps scoring the rest."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import msgspec
import pytest
import redis

from broker.base import DEAD, ROLLOUTS, SCORED, Broker
from broker.factory import connect
from broker.redis import RedisBroker
from broker.schemas import DeadLetter, Group, ScoredGroup, Task, encode
from broker.settings import BrokerConfig
from reward_service.config import RewardConfig
from reward_service.judges.rule import RuleJudge
from tests.integration.test_reward_worker import BROKER_FLAGS, EXPECTED, _drain, _group, _rewards, _run_worker, standard


@pytest.fixture
def broker_config(redis_url: str) -> BrokerConfig:
    return BrokerConfig(redis_url=redis_url, run_id=f"fq-{uuid.uuid4().hex[:8]}", **BROKER_FLAGS)


@pytest.fixture
def broker(broker_config: BrokerConfig) -> Iterator[RedisBroker]:
    b = connect(broker_config)
    assert isinstance(b, RedisBroker)
    yield b
    b.close()


def _xadd_raw(broker: RedisBroker, fields: dict[bytes, bytes]) -> str:
    """Append an entry as a foreign or buggy producer would: straight to the stream, past the broker's encoder."""
    client = redis.Redis.from_url(broker.config.redis_url, socket_timeout=5)
    try:
        return str(client.xadd(broker.key(ROLLOUTS), fields).decode())  # type: ignore[arg-type, union-attr]
    finally:
        client.close()


def _score(
    broker: Broker, config: RewardConfig, want_scored: int, want_dead: int, timeout_s: float = 30.0
) -> list[DeadLetter]:
    """Run a worker until it scored `want_scored` groups; return the dead letters (waiting for `want_dead`)."""
    worker = _run_worker(config, broker, RuleJudge(config.judge), lambda w: w.num_scored >= want_scored)  # type: ignore[arg-type]
    assert worker.num_scored == want_scored
    return _drain(broker, DEAD, DeadLetter, want_dead, timeout_s=timeout_s)


def test_malformed_and_oversized_entries_go_to_dead_and_the_worker_keeps_going(
    broker: RedisBroker, broker_config: BrokerConfig
) -> None:
    """Guards against a poison entry stopping the reward worker (crash, retry loop, stuck pending entry) or
    vanishing without a trace: each must land in `dead` with a reason naming the problem and its original
    bytes, while valid groups before and after it are scored."""
    config = RewardConfig(broker=broker_config, worker={"max_entry_mb": 0.05})
    producer = broker.producer(ROLLOUTS, Group)
    producer.publish([_group("g-before", standard(0))])
    garbage = b"\xc1\xff not msgpack \x00"
    wrong_type = encode(_group("as-task", standard(1)).task)  # a Task where a Group belongs
    not_a_struct = msgspec.msgpack.encode(42)
    future = encode(msgspec.structs.replace(_group("v99", standard(2)), schema_version=99))
    ids = {
        "garbage": _xadd_raw(broker, {b"d": garbage}),
        "wrong_type": _xadd_raw(broker, {b"d": wrong_type}),
        "not_a_struct": _xadd_raw(broker, {b"d": not_a_struct}),
        "future": _xadd_raw(broker, {b"d": future}),
    }
    huge = _group("huge", standard(3))
    huge.samples[0].text = "x" * 100_000  # 100 KB > max_entry_mb 0.05
    ids["oversized"] = producer.publish([huge])[0]  # type: ignore[assignment]
    producer.publish([_group("g-after", standard(4))])

    dead = {d.entry_id: d for d in _score(broker, config, want_scored=2, want_dead=5)}
    assert sorted(dead) == sorted(ids.values())
    reasons = {name: dead[entry_id].reason for name, entry_id in ids.items()}
    assert all(r.startswith("undecodable") for k, r in reasons.items() if k != "oversized"), reasons
    assert "Group" in reasons["wrong_type"] and "Group" in reasons["not_a_struct"]
    assert "schema_version 99" in reasons["future"]
    assert "exceeds the limit of 0.05 MB (--worker.max_entry_mb)" in reasons["oversized"]
    assert dead[ids["garbage"]].payload == garbage and dead[ids["wrong_type"]].payload == wrong_type
    assert all(d.stream == ROLLOUTS for d in dead.values())
    scored = _drain(broker, SCORED, ScoredGroup, 2)
    assert sorted(s.group_id for s in scored) == ["g-after", "g-before"]
    assert all(_rewards(s) == EXPECTED for s in scored)
    assert producer.backlog() == 0  # nothing left pending: the poison entries were acked with their dead letter


def test_poison_entries_do_not_starve_later_groups(broker: RedisBroker, broker_config: BrokerConfig) -> None:
    """Guards against a read batch made only of poison entries ending the read loop early (an empty batch
    read as 'no work'): 20 garbage entries ahead of one group must still let the group be scored."""
    config = RewardConfig(broker=broker_config)
    for i in range(20):
        _xadd_raw(broker, {b"d": b"\x92" + bytes([i])})  # a truncated msgpack array
    broker.producer(ROLLOUTS, Group).publish([_group("g-late", standard(0))])
    dead = _score(broker, config, want_scored=1, want_dead=20)
    assert len(dead) == 20 and all(d.reason.startswith("undecodable") for d in dead)
    assert [s.group_id for s in _drain(broker, SCORED, ScoredGroup, 1)] == ["g-late"]


def test_entry_without_the_payload_field_is_dead_lettered(broker: RedisBroker, broker_config: BrokerConfig) -> None:
    """Guards against a foreign entry (another field name, e.g. from a misconfigured producer) disappearing
    from `rollouts` without a dead letter (it used to be read as deleted and acked silently), so nobody learns
    that a producer is broken: it must land in `dead` with a reason naming the fields and keep its bytes."""
    config = RewardConfig(broker=broker_config)
    original = encode(_group("foreign", standard(0)))
    foreign = _xadd_raw(broker, {b"payload": original})
    broker.producer(ROLLOUTS, Group).publish([_group("g-ok", standard(1))])
    dead = _score(broker, config, want_scored=1, want_dead=1, timeout_s=5.0)
    assert [d.entry_id for d in dead] == [foreign]
    assert dead[0].reason == "undecodable: no payload field 'd' (the entry has fields ['payload'])"
    assert msgspec.msgpack.decode(dead[0].payload) == {b"payload": original}
    assert [s.group_id for s in _drain(broker, SCORED, ScoredGroup, 1)] == ["g-ok"]
    assert broker.producer(ROLLOUTS, Group).backlog() == 0


def test_peek_reports_foreign_and_garbage_entries_as_the_consumer_buries_them(broker: RedisBroker) -> None:
    """Guards against a harness's peek (the chaos and async benches watch streams with it) raising on a foreign
    or garbage entry, hiding it, or naming another reason than the dead letter the consumer then writes; the
    entries stay where they are until the consumer buries them."""
    foreign = _xadd_raw(broker, {b"payload": b"x"})
    garbage = _xadd_raw(broker, {b"d": b"\xc1 not msgpack"})
    ok = broker.producer(ROLLOUTS, Group).publish([_group("g-ok", standard(0))])[0]
    page = broker.view(ROLLOUTS).peek(Group)
    assert [e.id for e in page.entries] == [ok] and page.last_id == ok
    reasons = {u.id: u.reason for u in page.undecodable}
    assert list(reasons) == [foreign, garbage]
    assert reasons[foreign] == "undecodable: no payload field 'd' (the entry has fields ['payload'])"
    assert broker.producer(ROLLOUTS, Group).backlog() == 3
    got = broker.consumer(ROLLOUTS, Group, "reward", "w").read(10, block_s=1)
    assert [e.id for e in got] == [ok]
    letters = broker.view(DEAD).peek(DeadLetter).entries
    assert {d.msg.entry_id: d.msg.reason for d in letters} == reasons


def test_tasks_are_not_groups_even_when_fields_overlap() -> None:
    """Guards against the tagged wire schema accepting one message type as another (a Task decoded as a
    Group would be scored with no samples): decoding must fail, which sends the entry to `dead`."""
    from broker.schemas import SchemaError, decode

    task = _group("t", standard(0)).task
    with pytest.raises(SchemaError, match="Group"):
        decode(encode(task), Group)
    assert isinstance(decode(encode(task), Task), Task)
