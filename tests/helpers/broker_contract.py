"""The broker contract, written once and run against both backends.

Test modules import every `test_*` here with `from tests.helpers.broker_contract import *` and define a
`make_broker` fixture: a callable `make_broker(**config_overrides) -> Broker` whose brokers share one
backend store (one Redis database, or one MemoryStore) for the test, so that two brokers act like two
processes of one run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from broker.base import (
    DEAD,
    ROLLOUTS,
    SCORED,
    TASKS,
    BackpressureTimeout,
    Broker,
    Consumer,
    EngineInfo,
    Entry,
    EntryTooLarge,
    StreamStats,
)
from broker.schemas import DeadLetter, Group, RewardInfo, Sample, SampleReward, ScoredGroup, Task, decode

MakeBroker = Callable[..., Broker]


def make_task(i: int, prompt_len: int = 16) -> Task:
    return Task(
        run_id="r",
        group_id=f"g{i}",
        dataset_index=i,
        prompt_ids=np.arange(i, i + prompt_len, dtype=np.int32).tobytes(),
        label=f"label {i}",
        reward_info=RewardInfo(question=f"q{i}?", rubrics=["a", "b"]),
        num_samples=2,
        policy_version=i % 3,
    )


def make_rollout(i: int) -> Group:
    sample = Sample(
        response_ids=np.arange(8, dtype=np.int32).tobytes(),
        logprobs=np.full(8, -0.5, dtype=np.float32).tobytes(),
        text="<think>x</think>y",
        finish_reason="stop",
        status="completed",
    )
    return Group(task=make_task(i), samples=[sample, sample])


def _drain(consumer: Consumer[Any], n: int, timeout_s: float = 5.0) -> list[Entry[Any]]:
    """Read until `n` entries arrived (or the timeout), without acking."""
    out: list[Entry[Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out += consumer.read(n - len(out), block_s=0.2)
    return out


def _collect(consumer: Consumer[Any], quiet_s: float = 0.3) -> list[Entry[Any]]:
    """Read and ack everything until a read of `quiet_s` returns nothing."""
    out: list[Entry[Any]] = []
    while entries := consumer.read(100, block_s=quiet_s):
        consumer.ack([e.id for e in entries])
        out += entries
    return out


def test_round_trip_keeps_every_field(make_broker: MakeBroker) -> None:
    """Guards against a publish/read path that drops or mangles fields (numpy buffers included) or never acks."""
    broker = make_broker()
    producer = broker.producer(TASKS, Task)
    consumer = broker.consumer(TASKS, Task, "feeders", "c1")
    tasks = [make_task(i) for i in range(5)]
    ids = producer.publish(tasks)
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 5
    assert producer.backlog() == 5
    entries = _drain(consumer, 5)
    assert [e.msg for e in entries] == tasks
    assert [e.id for e in entries] == ids
    assert all(e.delivery_count == 1 for e in entries)
    np.testing.assert_array_equal(entries[3].msg.prompt_ids_np(), np.arange(3, 19))
    assert producer.backlog() == 5  # read but not acked: still pending
    consumer.ack([e.id for e in entries])
    assert producer.backlog() == 0
    assert consumer.read(10, block_s=0.05) == []


def test_publish_with_dedup_key_is_idempotent(make_broker: MakeBroker) -> None:
    """Guards against a dedup key that does not stop a second publish of the same group (or of a repeat in one batch)."""
    broker = make_broker()
    producer = broker.producer(ROLLOUTS, Group)
    first = producer.publish([make_rollout(1), make_rollout(2)], dedup_key=lambda g: g.group_id)
    assert all(first)
    again = producer.publish([make_rollout(2), make_rollout(3), make_rollout(3)], dedup_key=lambda g: g.group_id)
    assert again[0] is None and again[1] is not None and again[2] is None
    assert producer.backlog() == 3
    other_run = make_broker(run_id="another-run").producer(ROLLOUTS, Group)
    assert all(other_run.publish([make_rollout(1)], dedup_key=lambda g: g.group_id)), "dedup leaked across runs"


def test_restarted_consumer_rereads_its_own_pending_entries_first(make_broker: MakeBroker) -> None:
    """Guards against a restarted consumer that forgets what it had read but not acked (lost until reclaimed)."""
    broker = make_broker(claim_idle_s=3600)
    producer = broker.producer(TASKS, Task)
    producer.publish([make_task(i) for i in range(4)])
    before = _drain(broker.consumer(TASKS, Task, "g", "worker-0"), 2)
    producer.publish([make_task(9)])
    restarted = make_broker(claim_idle_s=3600).consumer(TASKS, Task, "g", "worker-0")
    again = restarted.read(10, block_s=0.5)
    assert [e.id for e in again] == [e.id for e in before]
    assert all(e.delivery_count == 2 for e in again)
    rest = _drain(restarted, 3)
    assert sorted(e.msg.group_id for e in rest) == ["g2", "g3", "g9"]
    assert all(e.delivery_count == 1 for e in rest)


def test_idle_entries_of_a_dead_consumer_are_claimed(make_broker: MakeBroker) -> None:
    """Guards against entries stuck forever in the pending list of a consumer that died."""
    broker = make_broker(claim_idle_s=0.2)
    broker.producer(TASKS, Task).publish([make_task(i) for i in range(3)])
    dead = _drain(broker.consumer(TASKS, Task, "g", "dies"), 3)
    survivor = broker.consumer(TASKS, Task, "g", "lives")
    assert survivor.read(10, block_s=0) == []  # not idle long enough yet
    claimed = _drain(survivor, 3, timeout_s=5)
    assert sorted(e.id for e in claimed) == sorted(e.id for e in dead)
    assert all(e.delivery_count == 2 for e in claimed)
    survivor.ack([e.id for e in claimed])
    assert broker.producer(TASKS, Task).backlog() == 0


def test_redelivered_work_publishes_once_with_dedup(make_broker: MakeBroker) -> None:
    """Guards against double-scored groups when a consumer dies after publishing its output but before acking."""
    broker = make_broker(claim_idle_s=0.2)
    broker.producer(ROLLOUTS, Group).publish([make_rollout(i) for i in range(4)])
    scored = broker.producer(SCORED, ScoredGroup)

    def score(entries: list[Entry[Group]]) -> None:
        out = [
            ScoredGroup(group=e.msg, rewards=[SampleReward(reward=1.0, outcome_reward=1.0, rubric_reward=0.5)] * 2)
            for e in entries
        ]
        scored.publish(out, dedup_key=lambda s: s.group_id)

    first = broker.consumer(ROLLOUTS, Group, "reward", "w1")
    score(_drain(first, 4)[:3])  # crashes after publishing three of its four outputs, before acking
    second = broker.consumer(ROLLOUTS, Group, "reward", "w2")
    redelivered = _drain(second, 4)
    score(redelivered)
    second.ack([e.id for e in redelivered])
    out = _collect(broker.consumer(SCORED, ScoredGroup, "learner", "l"))
    assert sorted(s.msg.group_id for s in out) == ["g0", "g1", "g2", "g3"]


def test_undecodable_entry_goes_to_dead_and_consumer_goes_on(make_broker: MakeBroker) -> None:
    """Guards against a poison entry that crashes or blocks the consumer instead of going to `dead` with a reason."""
    broker = make_broker()
    producer = broker.producer(ROLLOUTS, Group)
    producer.publish([make_rollout(0)])
    wrong_id = broker.producer(ROLLOUTS, Task).publish([make_task(1)])[0]  # a Task on the Group stream
    producer.publish([make_rollout(2)])
    consumer = broker.consumer(ROLLOUTS, Group, "reward", "w")
    got = _drain(consumer, 2)
    assert [e.msg.group_id for e in got] == ["g0", "g2"]
    consumer.ack([e.id for e in got])
    assert producer.backlog() == 0
    dead = _collect(broker.consumer(DEAD, DeadLetter, "ops", "o"))
    assert len(dead) == 1
    letter = dead[0].msg
    assert letter.stream == ROLLOUTS and letter.entry_id == wrong_id and letter.consumer == "w"
    assert letter.reason.startswith("undecodable") and letter.delivery_count == 1
    assert decode(letter.payload, Task) == make_task(1)


def test_over_delivered_entry_goes_to_dead(make_broker: MakeBroker) -> None:
    """Guards against an entry that kills every consumer being redelivered forever (poison pill)."""
    broker = make_broker(max_deliveries=2)
    broker.producer(TASKS, Task).publish([make_task(7)])
    counts = []
    for _ in range(3):  # the consumer "crashes" on it and restarts, three times
        crashy = make_broker(max_deliveries=2).consumer(TASKS, Task, "g", "crashy")
        counts += [e.delivery_count for e in crashy.read(1, block_s=0.1)]
    assert counts == [1, 2]
    assert broker.producer(TASKS, Task).backlog() == 0
    dead = _collect(broker.consumer(DEAD, DeadLetter, "ops", "o"))
    assert len(dead) == 1
    letter = dead[0].msg
    assert letter.delivery_count == 3 and "delivered 3 times" in letter.reason
    assert decode(letter.payload, Task).group_id == "g7"


def test_held_entries_are_not_redelivered_to_their_live_holder(make_broker: MakeBroker) -> None:
    """Guards against a consumer that holds entries past claim_idle_s (the learner until its checkpoint)
    getting them again from its own claim, counted as extra deliveries (later wrongly dead-lettered)."""
    broker = make_broker(claim_idle_s=0.1, max_deliveries=2)
    producer = broker.producer(TASKS, Task)
    producer.publish([make_task(i) for i in range(2)])
    holder = broker.consumer(TASKS, Task, "g", "learner")
    held = _drain(holder, 2)
    for _ in range(4):  # idle past claim_idle_s several times while the holder keeps reading
        time.sleep(0.15)
        assert holder.read(10, block_s=0.05) == []
    producer.publish([make_task(9)])
    assert [e.msg.group_id for e in holder.read(10, block_s=1)] == ["g9"]
    holder.ack([e.id for e in held])
    assert producer.backlog() == 1


def test_touch_keeps_held_entries_from_being_claimed(make_broker: MakeBroker) -> None:
    """Guards against a consumer busy with long work (all slots full, so not calling read) losing its
    entries to another consumer after claim_idle_s: duplicated generation, and deliveries counted towards
    the dead-letter limit. touch() renews the lease; without it the entries are claimed."""
    broker = make_broker(claim_idle_s=0.4)
    broker.producer(TASKS, Task).publish([make_task(i) for i in range(2)])
    busy = broker.consumer(TASKS, Task, "g", "busy")
    held = _drain(busy, 2)
    other = broker.consumer(TASKS, Task, "g", "other")
    for _ in range(6):  # 0.9 s in all, more than twice claim_idle_s
        busy.touch()
        time.sleep(0.15)
        assert other.read(10, block_s=0) == []
    time.sleep(0.5)  # no touch: the lease runs out and the entries are claimed
    assert sorted(e.id for e in _drain(other, 2)) == sorted(e.id for e in held)


def test_a_reading_consumer_renews_its_leases_before_they_expire(make_broker: MakeBroker) -> None:
    """Guards against leases renewed only once they had expired (issue 19, defect 3): a consumer with free slots
    keeps reading and never calls touch(); its held entries were renewed only when its own claim pass saw them idle
    for claim_idle_s, by which time another consumer could claim them (two rollout workers generating the same
    group). Reads renew every held entry before its lease runs out, whatever their block time."""
    claim_idle_s = 0.6
    broker = make_broker(claim_idle_s=claim_idle_s)
    broker.producer(TASKS, Task).publish([make_task(i) for i in range(2)])
    holder = broker.consumer(TASKS, Task, "g", "holder")
    held = _drain(holder, 2)
    claimed: list[str] = []
    done = threading.Event()

    def poll() -> None:  # a second consumer, as eager as possible: it claims any entry whose lease ran out
        other = make_broker(claim_idle_s=claim_idle_s)
        while not done.is_set():
            got = other.consumer(TASKS, Task, "g", "other").read(10, block_s=0)  # fresh: looks for idle at once
            claimed.extend(e.msg.group_id for e in got)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        deadline = time.monotonic() + 4 * claim_idle_s
        while time.monotonic() < deadline and not claimed:
            assert holder.read(10, block_s=0.4) == []  # each read blocks longer than a renewal interval
    finally:
        done.set()
        poller.join(10)
    assert claimed == [], "another consumer claimed entries their live holder keeps reading"
    holder.ack([e.id for e in held])
    assert broker.producer(TASKS, Task).backlog() == 0


def test_touch_never_takes_back_an_entry_another_consumer_claimed(make_broker: MakeBroker) -> None:
    """Guards against a lease renewal that does not check the holder: a consumer that stalled past claim_idle_s
    (its entry claimed by another in the meantime) took the entry back on its next touch(), so both worked on it
    and the claimer's ack raced the stalled one's renewals. The renewal covers only entries still held."""
    broker = make_broker(claim_idle_s=0.2)
    broker.producer(TASKS, Task).publish([make_task(0)])
    stalled = broker.consumer(TASKS, Task, "g", "stalled")
    [entry] = _drain(stalled, 1)
    time.sleep(0.3)
    rescuer = broker.consumer(TASKS, Task, "g", "rescuer")
    assert [e.id for e in _drain(rescuer, 1)] == [entry.id]
    stalled.touch()
    assert list(broker.view(TASKS).stats().groups["g"].holders) == ["rescuer"]
    assert stalled.read(1, block_s=0.05) == []
    assert list(broker.view(TASKS).stats().groups["g"].holders) == ["rescuer"]
    rescuer.ack([entry.id])
    assert broker.producer(TASKS, Task).backlog() == 0


def test_application_dead_letter_keeps_reason_and_acks(make_broker: MakeBroker) -> None:
    """Guards against dead_letter() losing the reason or leaving the entry pending (redelivered later)."""
    broker = make_broker(claim_idle_s=0.05)
    broker.producer(ROLLOUTS, Group).publish([make_rollout(5)])
    consumer = broker.consumer(ROLLOUTS, Group, "reward", "w")
    entry = _drain(consumer, 1)[0]
    consumer.dead_letter(entry, "judge returned HTTP 400: prompt too long")
    consumer.dead_letter(entry, "a second call must not write a second letter")
    time.sleep(0.1)
    assert consumer.read(1, block_s=0.1) == []
    letters = _collect(broker.consumer(DEAD, DeadLetter, "ops", "o"))
    assert [d.msg.reason for d in letters] == ["judge returned HTTP 400: prompt too long"]
    assert decode(letters[0].msg.payload, Group) == make_rollout(5)


def test_backpressure_blocks_then_times_out_then_resumes(make_broker: MakeBroker) -> None:
    """Guards against an unbounded stream (producers must wait for consumers) and a wait without a timeout."""
    broker = make_broker(max_backlog=3)
    producer = broker.producer(TASKS, Task)
    assert len(producer.publish([make_task(i) for i in range(3)])) == 3
    with pytest.raises(BackpressureTimeout):
        producer.publish([make_task(3)], timeout_s=0.2)
    assert producer.backlog() == 3
    # A batch larger than the limit goes through in pieces as the consumer drains.
    result: list[list[str | None]] = []
    publisher = threading.Thread(
        target=lambda: result.append(producer.publish([make_task(i) for i in range(4, 9)], timeout_s=10))
    )
    publisher.start()
    consumer = broker.consumer(TASKS, Task, "g", "c")
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while len(seen) < 8 and time.monotonic() < deadline:
        assert producer.undelivered() <= 3
        entries = consumer.read(2, block_s=0.2)
        consumer.ack([e.id for e in entries])
        seen += [e.msg.group_id for e in entries]
    publisher.join(10)
    assert seen == [f"g{i}" for i in (0, 1, 2, 4, 5, 6, 7, 8)]  # in order
    assert len(result) == 1 and all(result[0])


def test_held_entries_do_not_block_producers_but_undelivered_ones_do(make_broker: MakeBroker) -> None:
    """Guards against the default deadlock: the learner holds delivered, unacked `scored` entries until its next
    checkpoint (336 with the defaults, over max_backlog 256). If held entries counted towards backpressure, the
    reward workers would block forever publishing the very entries the learner needs to reach that checkpoint.
    Entries nobody has taken yet must still block, or Redis memory is unbounded."""
    broker = make_broker(max_backlog=3, claim_idle_s=3600)
    producer = broker.producer(TASKS, Task)
    assert producer.undelivered() == 0  # the stream does not exist yet
    producer.publish([make_task(i) for i in range(3)])
    assert producer.undelivered() == 3  # no consumer group yet: everything counts
    with pytest.raises(BackpressureTimeout, match="--broker.max_backlog"):
        producer.publish([make_task(3)], timeout_s=0.2)
    holder = broker.consumer(TASKS, Task, "learner", "l")
    held = _drain(holder, 3)
    assert (producer.undelivered(), producer.backlog()) == (0, 3)
    assert all(producer.publish([make_task(i) for i in range(3, 6)], timeout_s=5))  # nothing acked, yet room
    held += _drain(holder, 3)
    assert all(producer.publish([make_task(i) for i in range(6, 9)], timeout_s=5))
    with pytest.raises(BackpressureTimeout):  # 6 held do not count, 3 undelivered do
        producer.publish([make_task(9)], timeout_s=0.2)
    assert (producer.undelivered(), producer.backlog()) == (3, 9)
    # A producer blocked on undelivered entries resumes as soon as they are delivered, acked or not.
    result: list[list[str | None]] = []
    blocked = threading.Thread(target=lambda: result.append(producer.publish([make_task(9)], timeout_s=10)))
    blocked.start()
    held += _drain(holder, 3)
    blocked.join(10)
    assert len(result) == 1 and all(result[0])
    holder.ack([e.id for e in held])
    assert producer.backlog() == 1 and [e.msg.group_id for e in _drain(holder, 1)] == ["g9"]


def test_oversized_message_is_refused_at_publish(make_broker: MakeBroker) -> None:
    """Guards against a runaway producer writing an arbitrarily large entry into Redis (memory, and every consumer
    has to read it): the whole batch is refused before anything is appended, naming the flag."""
    broker = make_broker(max_entry_mb=0.01)
    producer = broker.producer(TASKS, Task)
    big = make_task(1, prompt_len=4096)  # 16 KB of prompt ids > 0.01 MB
    with pytest.raises(EntryTooLarge, match=r"message 1 of 2 .* over the limit of 0.01 MB \(--broker.max_entry_mb\)"):
        producer.publish([make_task(0), big])
    assert producer.backlog() == 0
    assert all(producer.publish([make_task(0)]))


def test_policy_version_cas_and_wait_for_change(make_broker: MakeBroker) -> None:
    """Guards against a lost update in compare-and-set and a wait_for_change that misses a change or never returns."""
    pv = make_broker().policy_version
    assert pv.get() == 0
    pv.set(3)
    assert pv.compare_and_set(3, 4) is True
    assert pv.compare_and_set(3, 5) is False
    assert pv.get() == 4
    assert pv.wait_for_change(4, timeout_s=0.2) == 4  # times out, returns the unchanged version
    assert pv.wait_for_change(2, timeout_s=5) == 4  # already different: returns at once
    other = make_broker().policy_version
    timer = threading.Timer(0.2, lambda: other.set(5))
    timer.start()
    start = time.monotonic()
    assert pv.wait_for_change(4, timeout_s=30) == 5
    assert time.monotonic() - start < 15, "wait_for_change slept through the change"
    timer.join()


def test_engine_registry_heartbeat_ttl(make_broker: MakeBroker) -> None:
    """Guards against dead engines staying in the live list, and heartbeats that do not refresh the TTL."""
    engines = make_broker().engines
    engines.register(EngineInfo(engine_id="e2", url="http://h:2", tp_size=2), ttl_s=0.6)
    engines.register(EngineInfo(engine_id="e1", url="http://h:1"), ttl_s=60)
    live = engines.live()
    assert [e.engine_id for e in live] == ["e1", "e2"]
    assert live[1].tp_size == 2 and live[1].heartbeat_s > time.time() - 60
    time.sleep(0.35)
    engines.register(EngineInfo(engine_id="e2", url="http://h:2", tp_size=2), ttl_s=0.6)  # heartbeat
    time.sleep(0.35)
    assert [e.engine_id for e in engines.live()] == ["e1", "e2"]
    time.sleep(0.4)
    assert [e.engine_id for e in engines.live()] == ["e1"]
    engines.deregister("e1")
    assert engines.live() == []
    with pytest.raises(ValueError, match="ttl_s"):
        engines.register(EngineInfo(engine_id="e3", url="http://h:3"), ttl_s=0)


def test_run_state_hash(make_broker: MakeBroker) -> None:
    """Guards against run state that is not shared between brokers of one run, or leaks into another run."""
    state = make_broker().state
    assert state.get("status") is None
    state.set("status", "training")
    assert state.incr("steps") == 1 and state.incr("steps", 4) == 5
    assert make_broker().state.all() == {"status": "training", "steps": "5"}
    assert make_broker(run_id="other").state.all() == {}


def test_one_consumer_group_per_stream(make_broker: MakeBroker) -> None:
    """Guards against a second consumer group on a stream, whose entries the first group's acks would delete."""
    broker = make_broker()
    broker.consumer(ROLLOUTS, Group, "reward", "w1")
    broker.consumer(ROLLOUTS, Group, "reward", "w2")
    with pytest.raises(ValueError, match="one group per stream"):
        broker.consumer(ROLLOUTS, Group, "audit", "a1")


def test_unknown_stream_is_a_clear_error(make_broker: MakeBroker) -> None:
    """Guards against a typo in a stream name silently creating a stream no one reads."""
    broker = make_broker()
    with pytest.raises(ValueError, match="unknown stream 'rollout'"):
        broker.producer("rollout", Group)
    with pytest.raises(ValueError, match="count"):
        broker.consumer(TASKS, Task, "g", "c").read(0)


def test_concurrent_consumers_get_each_entry_once(make_broker: MakeBroker) -> None:
    """Guards against races that hand one entry to two live consumers, or lose one, under concurrency."""
    broker = make_broker(max_backlog=8)
    producer = broker.producer(TASKS, Task)
    got: list[str] = []
    lock = threading.Lock()

    def consume(name: str) -> None:
        consumer = make_broker(max_backlog=8).consumer(TASKS, Task, "g", name)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            entries = consumer.read(3, block_s=0.1)
            if not entries and len(got) >= 40:
                return
            with lock:
                got.extend(e.msg.group_id for e in entries)
            consumer.ack([e.id for e in entries])

    threads = [threading.Thread(target=consume, args=(f"c{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for start in range(0, 40, 5):
        producer.publish([make_task(i) for i in range(start, start + 5)], timeout_s=10)
    for t in threads:
        t.join(15)
    assert sorted(got) == sorted(f"g{i}" for i in range(40))


def test_view_peeks_without_consuming(make_broker: MakeBroker) -> None:
    """Guards against a harness's look at a stream changing what its consumers get (a peek that delivers, claims
    or acks), a peek that raises on an entry the consumer would dead-letter instead of reporting it, and paging
    that skips or repeats entries."""
    broker = make_broker()
    producer = broker.producer(ROLLOUTS, Group)
    ids = producer.publish([make_rollout(0), make_rollout(1)])
    wrong = broker.producer(ROLLOUTS, Task).publish([make_task(2)])[0]  # a Task on the Group stream
    ids += producer.publish([make_rollout(3)])
    view = broker.view(ROLLOUTS)
    first = view.peek(Group, count=2)
    assert [e.msg for e in first.entries] == [make_rollout(0), make_rollout(1)] and first.undecodable == []
    assert [e.id for e in first.entries] == ids[:2] and first.last_id == ids[1]
    assert all(e.delivery_count == 0 for e in first.entries)
    second = view.peek(Group, first.last_id, count=2)
    assert [e.id for e in second.entries] == ids[2:] and second.last_id == ids[2]
    assert [u.id for u in second.undecodable] == [wrong] and second.undecodable[0].reason.startswith("undecodable")
    end = view.peek(Group, second.last_id)
    assert (end.entries, end.undecodable, end.last_id) == ([], [], second.last_id)
    consumer = broker.consumer(ROLLOUTS, Group, "reward", "w")
    got = _drain(consumer, 3)
    assert [e.id for e in got] == ids and all(e.delivery_count == 1 for e in got)  # as if no one had looked
    assert [e.id for e in view.peek(Group).entries] == ids  # pending entries are still in the stream
    consumer.ack([got[0].id])
    assert [e.id for e in view.peek(Group).entries] == ids[1:]
    dead = broker.view(DEAD).peek(DeadLetter).entries  # the consumer buried what the peek reported
    assert [(d.msg.entry_id, d.msg.reason) for d in dead] == [(wrong, second.undecodable[0].reason)]
    with pytest.raises(ValueError, match="entry id"):
        view.peek(Group, "latest")
    with pytest.raises(ValueError, match="count"):
        view.peek(Group, count=0)


def test_view_stats_and_dedup_keys(make_broker: MakeBroker) -> None:
    """Guards against a harness reading a stream's length, its group's pending entries and who holds them (the
    chaos bench's accounting) wrongly, or the groups ever published (dedup keys) wrongly or from another run."""
    broker = make_broker(claim_idle_s=3600)
    view = broker.view(TASKS)
    assert view.stats() == StreamStats(length=0, groups={}) and view.dedup_keys() == set()
    producer = broker.producer(TASKS, Task)
    producer.publish([make_task(i) for i in range(4)], dedup_key=lambda t: t.group_id)
    producer.publish([make_task(9)])  # without a dedup key
    assert view.stats() == StreamStats(length=5, groups={})
    consumer = broker.consumer(TASKS, Task, "feeders", "c1")
    got = _drain(consumer, 3)
    consumer.ack([got[0].id])
    stats = view.stats()
    assert stats.length == 4 and list(stats.groups) == ["feeders"] and stats.groups["feeders"].pending == 2
    holders = stats.groups["feeders"].holders
    assert list(holders) == ["c1"] and holders["c1"].pending == 2 and 0 <= holders["c1"].idle_s < 60
    assert view.dedup_keys() == {"g0", "g1", "g2", "g3"}
    assert broker.view(ROLLOUTS).dedup_keys() == set()
    make_broker(run_id="run-2").producer(TASKS, Task).publish([make_task(5)], dedup_key=lambda t: t.group_id)
    assert make_broker(run_id="run*").view(TASKS).dedup_keys() == set(), "dedup keys of another run"
    with pytest.raises(ValueError, match="unknown stream"):
        broker.view("task")
