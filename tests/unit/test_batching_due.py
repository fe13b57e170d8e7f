"""Oldest-first steps: the reader waits (bounded) for due groups, carries the younger surplus, and keeps it unacked
across a checkpoint (real redis-server, the learner's real ScoredReader and LearnerState)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.base import SCORED, Broker
from broker.factory import connect
from broker.schemas import ScoredGroup, pack_logprobs
from broker.settings import BrokerConfig
from learner.batching import TrainBatch
from learner.scored_reader import CONSUMER_GROUP, ScoredReader
from learner.state import LearnerState
from learner.train_config import BatchConfig, DataConfig, LossConfig
from tests.helpers.scored_groups import make_scored

RUN_ID = "due-test"


def _scored(gid: str, version: int, rewards: tuple[float, ...] = (1.0, 0.0)) -> ScoredGroup:
    """A group admitted and generated at `version` (its one weight segment)."""
    return make_scored(gid, version, rewards, run_id=RUN_ID)


def _broker(redis_url: str) -> Broker:
    return connect(BrokerConfig(redis_url=redis_url, run_id=RUN_ID, socket_timeout_s=5, connect_timeout_s=2))


def _reader(broker: Broker, state: LearnerState, due_wait_s: float, groups_per_step: int = 2) -> ScoredReader:
    consumer = broker.consumer(SCORED, ScoredGroup, group=CONSUMER_GROUP, name="learner")
    return ScoredReader(
        consumer,
        state,
        DataConfig(groups_per_step=groups_per_step, max_staleness=1),
        BatchConfig(due_wait_s=due_wait_s),
        LossConfig(),
    )


def _poll_until_batch(reader: ScoredReader, block_s: float = 0.1, max_polls: int = 100) -> TrainBatch:
    """Poll as BatchChannel does (None = still waiting); fail instead of hanging."""
    for _ in range(max_polls):
        batch = reader.poll(block_s)
        if batch is not None:
            return batch
    raise AssertionError(f"no batch after {max_polls} polls of {block_s}s")


def _train_step(state: LearnerState, batch: TrainBatch) -> None:
    """What train_loop does to the state around a step: count it, then the push moves the policy version."""
    state.step += 1
    state.num_trained_groups += len(batch.group_ids)
    state.policy_version += 1


def test_due_older_group_is_waited_for_trained_first_and_the_younger_surplus_next_step(redis_url: str) -> None:
    """Guards against the stale-drop waste of async RL: a group admitted one version earlier (due: it would be too
    old after this step) must not be overtaken by younger groups that arrived first; the step waits for it, trains
    it, and the younger surplus is trained at the next step, not dropped and not trained twice."""
    broker = _broker(redis_url)
    producer = broker.producer(SCORED, ScoredGroup)
    state = LearnerState(policy_version=1, admitted_unread={"o1": 0, "o2": 0, "y1": 1, "y2": 1})
    reader = _reader(broker, state, due_wait_s=60.0)
    producer.publish([_scored("o1", 0), _scored("y1", 1), _scored("y2", 1)])  # o2 was aborted, resumed: late
    assert reader.poll(0.3) is None  # o1 + y1 would fill the step, but o2 is due and y1 can wait a step
    producer.publish([_scored("o2", 0)])
    first = _poll_until_batch(reader)
    assert first.group_ids == ["o1", "o2"]
    assert first.metrics["staleness/1"] == 2 and first.metrics["carried_groups"] == 2
    assert first.metrics["due_given_up"] == 0 and first.metrics["due_wait_s"] > 0
    _train_step(state, first)
    assert reader.ack_held() == 2 and producer.backlog() == 2  # the carried y1, y2 stay unacked
    second = _poll_until_batch(reader)
    assert second.group_ids == ["y1", "y2"] and second.metrics["staleness/1"] == 2
    _train_step(state, second)
    assert state.num_dropped_stale == 0 and state.num_duplicates == 0
    assert all(reader.ledger.is_decided(g) for g in ["o1", "o2", "y1", "y2"]) and state.admitted_unread == {}
    assert reader.ack_held() == 2 and producer.backlog() == 0
    broker.close()


def test_due_wait_zero_takes_the_first_groups_to_arrive(redis_url: str) -> None:
    """Guards the off switch (--batch.due_wait_s 0 = the old stream-order behaviour) and shows what the wait
    saves: the overtaken group o2 is read one version too late and dropped as stale."""
    broker = _broker(redis_url)
    producer = broker.producer(SCORED, ScoredGroup)
    state = LearnerState(policy_version=1, admitted_unread={"o1": 0, "o2": 0, "y1": 1, "y2": 1})
    reader = _reader(broker, state, due_wait_s=0.0)
    producer.publish([_scored("o1", 0), _scored("y1", 1), _scored("y2", 1)])
    first = _poll_until_batch(reader)
    assert first.group_ids == ["o1", "y1"] and first.metrics["due_wait_s"] == 0
    _train_step(state, first)
    producer.publish([_scored("o2", 0), _scored("y3", 2)])
    second = _poll_until_batch(reader)
    assert second.group_ids == ["y2", "y3"]
    assert state.num_dropped_stale == 1 and reader.ledger.is_decided("o2")
    broker.close()


def test_wait_for_a_due_group_that_never_comes_is_bounded_and_not_repeated(redis_url: str) -> None:
    """Guards against a lost group (dead-lettered upstream, its worker gone) hanging the learner: the step waits at
    most due_wait_s, trains what it has, and never waits for that group again."""
    broker = _broker(redis_url)
    producer = broker.producer(SCORED, ScoredGroup)
    state = LearnerState(policy_version=1, admitted_unread={"lost": 0, "y1": 1, "y2": 1, "y3": 1, "y4": 1})
    reader = _reader(broker, state, due_wait_s=0.5)
    producer.publish([_scored("y1", 1), _scored("y2", 1)])
    first = _poll_until_batch(reader, block_s=0.1, max_polls=50)
    assert first.group_ids == ["y1", "y2"]
    assert first.metrics["due_given_up"] == 1
    assert "lost" in state.admitted_unread  # still admitted: it may come, or be released (upstream.py)
    # A second step at the same version (rarer pushes) does not wait for it again (a repeated wait would give it up
    # a second time).
    producer.publish([_scored("y3", 1), _scored("y4", 1)])
    second = _poll_until_batch(reader, block_s=0.1, max_polls=50)
    assert second.group_ids == ["y3", "y4"] and second.metrics["due_given_up"] == 0
    broker.close()


def test_a_due_group_read_and_dead_lettered_is_no_longer_due(redis_url: str) -> None:
    """Guards against waiting for a group the learner itself has already disposed of (dead-lettered as malformed):
    it is read, so the step completes without waiting out due_wait_s."""
    broker = _broker(redis_url)
    producer = broker.producer(SCORED, ScoredGroup)
    bad = _scored("bad", 0)
    bad.group.samples[0].logprobs = pack_logprobs([-1.0])
    state = LearnerState(policy_version=1, admitted_unread={"bad": 0, "y1": 1, "y2": 1})
    reader = _reader(broker, state, due_wait_s=60.0)
    producer.publish([_scored("y1", 1), _scored("y2", 1), bad])
    batch = reader.poll(5.0)  # a wait for "bad" would take 60 s and return None here
    assert batch is not None and batch.group_ids == ["y1", "y2"]
    assert state.groups_dead_lettered == {"invalid": 1} and state.admitted_unread == {}
    broker.close()


@pytest.mark.parametrize("crash", ["before_save", "after_save_before_ack", "after_ack"])
def test_carried_surplus_survives_a_checkpoint_and_restart(redis_url: str, tmp_path: Path, crash: str) -> None:
    """Guards the checkpoint/ack protocol with a carried surplus: a crash at any point around the checkpoint after a
    step that carried y1, y2 must neither lose them (acked, or listed as consumed, before they were trained) nor
    train any group twice in the final lineage."""
    broker = _broker(redis_url)
    producer = broker.producer(SCORED, ScoredGroup)
    state = LearnerState(policy_version=1, admitted_unread={"o1": 0, "o2": 0, "y1": 1, "y2": 1})
    before_step = tmp_path / "before.json"
    state.save(before_step)
    reader = _reader(broker, state, due_wait_s=60.0)
    producer.publish([_scored("y1", 1), _scored("o1", 0), _scored("y2", 1), _scored("o2", 0)])
    first = _poll_until_batch(reader)
    assert first.group_ids == ["o1", "o2"] and reader.num_carried == 2
    _train_step(state, first)
    saved = tmp_path / "state.json"
    if crash == "before_save":
        saved = before_step  # the previous checkpoint stays in force
    else:
        state.save(saved)  # the checkpoint: state first, then the acks
        if crash == "after_ack":
            assert reader.ack_held() == 2
    broker.close()  # the learner dies here; its unacked entries stay pending under its consumer name

    broker = _broker(redis_url)
    state = LearnerState.load(saved)
    reader = _reader(broker, state, due_wait_s=60.0)
    trained = [] if crash == "before_save" else list(first.group_ids)
    while state.step < 2:
        batch = _poll_until_batch(reader)
        trained += batch.group_ids
        _train_step(state, batch)
    assert sorted(trained) == ["o1", "o2", "y1", "y2"]  # each once in the final lineage: nothing lost or repeated
    assert all(reader.ledger.is_decided(g) for g in ["o1", "o2", "y1", "y2"]) and state.admitted_unread == {}
    assert state.num_trained_groups == 4 and state.num_dropped_stale == 0
    assert reader.poll(0.2) is None  # nothing left to train (reads any redelivered copy still pending)
    assert state.num_duplicates == (2 if crash == "after_save_before_ack" else 0)  # o1, o2 came back: skipped
    reader.ack_held()
    assert producer.backlog() == 0 and reader.num_carried == 0
    broker.close()


def test_due_wait_must_stay_below_the_batch_timeout() -> None:
    """Guards against a due wait that outlasts --batch.batch_timeout_s (the step would time out while waiting):
    the error names both flags."""
    with pytest.raises(ValueError, match="--batch.due_wait_s .* --batch.batch_timeout_s"):
        BatchConfig(due_wait_s=60.0, batch_timeout_s=30.0)
    assert BatchConfig(due_wait_s=0.0).due_wait_s == 0.0  # 0 switches the wait off
