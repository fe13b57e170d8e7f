"""The record of decided groups is bounded and still refuses duplicates; checkpoints written before it still load
(the learner's feeder, ScoredReader, UpstreamReleases and LearnerState over the in-process broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.base import SCORED, TASKS
from broker.memory import MemoryBroker
from broker.schemas import ScoredGroup, Task
from broker.settings import BrokerConfig
from datagen.dataset import make_row, write_rows
from datagen.prompts import JsonlDataset
from learner.ledger import GroupLedger
from learner.scored_reader import CONSUMER_GROUP
from learner.state import LearnerState
from learner.train_config import BatchConfig, DataConfig
from tests.helpers.learner_pipeline import LearnerPipeline
from tests.helpers.scored_driver import scored_group

RUN_ID = "ledger"
DATA = DataConfig(groups_per_step=2, max_staleness=1, num_samples=2, seed=3)
BATCH = BatchConfig(due_wait_s=0.5, batch_timeout_s=60, lost_scan_after_s=10)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from rollout_server.models import build_bpe_tokenizer

    return build_bpe_tokenizer(300, ["the river rises in the hills and flows to the sea " * 20])


@pytest.fixture
def dataset(tmp_path: Path) -> JsonlDataset:
    rows = [make_row(f"Documents: doc {i}. Question {i}?", f"a{i}", f"q{i}", [f"e{i}"], "longqa") for i in range(7)]
    write_rows(tmp_path / "data.jsonl", rows)
    return JsonlDataset(tmp_path / "data.jsonl")


def _broker() -> MemoryBroker:
    return MemoryBroker(BrokerConfig(redis_url="memory://", run_id=RUN_ID, claim_idle_s=3600))


def _size(state: LearnerState) -> int:
    return len(msgspec.json.encode(state))


def test_the_saved_state_does_not_grow_with_the_run_and_still_refuses_duplicates(
    dataset: JsonlDataset, tokenizer: Any, tmp_path: Path
) -> None:
    """Guards against the checkpointed state growing with every group of the run (it listed every consumed id: a
    long run's state file, rewritten at every checkpoint, grew without bound), and against the bounded record
    letting a copy of a group trained long ago be trained again, before or after a restart."""
    broker = _broker()
    run = LearnerPipeline(broker, dataset, tokenizer, DATA, BATCH, max_steps=40, checkpoint_path=tmp_path / "s.json")
    run.max_steps = 10
    assert run.run(timeout_s=30)
    early = _size(run.state)
    run.max_steps = 40
    assert run.run(timeout_s=60)
    assert _size(run.state) <= early + 64  # 30 more steps, 60 more groups: only counters and epoch numbers grew
    first = run.trained[0][0]
    trained = [g for step in run.trained for g in step]
    assert len(trained) == len(set(trained)) == 80

    copy = scored_group(_task_of(first), alternate_rewards=True)
    broker.producer(SCORED, ScoredGroup).publish([copy])  # published twice (no dedup key): a duplicate
    assert run.reader.poll(0.1) is None and run.state.num_duplicates == 1

    restarted = LearnerPipeline(
        broker, dataset, tokenizer, DATA, BATCH, max_steps=40, state=LearnerState.load(tmp_path / "s.json")
    )
    broker.producer(SCORED, ScoredGroup).publish([copy])
    assert restarted.reader.poll(0.1) is None
    assert restarted.state.num_duplicates == 2  # the saved count (1) plus this copy: refused after the restart too


def _task_of(group_id: str) -> Task:
    """The task of one of the run's groups, rebuilt from the deterministic feeder order (its stream entry is gone)."""
    epoch, index = group_id.removeprefix(f"{RUN_ID}/e").split("/i")
    from broker.schemas import RewardInfo, pack_ids

    return Task(
        run_id=RUN_ID,
        group_id=group_id,
        dataset_index=int(index),
        epoch=int(epoch),
        prompt_ids=pack_ids([1, 2, 3]),
        label="x",
        reward_info=RewardInfo(question="q"),
        num_samples=2,
        policy_version=0,
    )


def test_ids_that_are_not_the_feeders_are_remembered_for_two_checkpoint_intervals() -> None:
    """Guards the bound of the record without a dataset (SFT demonstrations, foreign ids): a decided id is refused
    until two checkpoints have passed (its entry is acked after the first), then forgotten, not kept forever."""
    state = LearnerState()
    ledger = GroupLedger(state)
    ledger.decide("sft/e0/i1")
    assert ledger.is_decided("sft/e0/i1")
    ledger.checkpointed()
    assert ledger.is_decided("sft/e0/i1") and GroupLedger(state).is_decided("sft/e0/i1")
    ledger.checkpointed()
    assert not ledger.is_decided("sft/e0/i1")
    assert state.recent_decided == [] and state.recent_decided_before == []


def test_a_checkpoint_from_before_the_bounded_record_loads_and_resumes(
    dataset: JsonlDataset, tokenizer: Any, tmp_path: Path
) -> None:
    """Guards against old checkpoints (a list of every consumed id, `num_dead_lettered`) failing to load or resuming
    wrongly: decided groups stay refused, a group the old learner had read and carried (out of its admitted set,
    its entry still pending) is trained, a group it had given up waiting for is adopted again, and the old
    dead-letter count is kept."""
    broker = _broker()
    old = LearnerPipeline(broker, dataset, tokenizer, DATA, BATCH, max_steps=6)
    assert old.feeder.fill() == 4
    trained, carried, unread, given_up = list(old.state.admitted_unread)
    # The old learner trained `trained` and read `carried` (both pending in its consumer), and gave up waiting
    # for `given_up`, still generating somewhere. Its state file, in the old format:
    worker = broker.consumer(TASKS, Task, group="rollout", name="rollout-0")
    for entry in worker.read(4, block_s=0.1):
        if entry.msg.group_id in (trained, carried):
            broker.producer(SCORED, ScoredGroup).publish([scored_group(entry.msg, alternate_rewards=True)])
            worker.ack([entry.id])
    assert len(broker.consumer(SCORED, ScoredGroup, group=CONSUMER_GROUP, name="learner").read(2, 0.1)) == 2
    legacy = json.loads(msgspec.json.encode(old.state))
    for new_field in ("decided_ahead", "recent_decided", "recent_decided_before", "dead_read_after"):
        del legacy[new_field]
    del legacy["groups_dead_lettered"]
    legacy |= {
        "consumed_group_ids": [trained, "sft/e0/i9"],
        "num_dead_lettered": 2,
        "admitted_unread": {unread: 0},
        "num_trained_groups": 1,
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(legacy))

    state = LearnerState.load(path)
    assert state.groups_dead_lettered == {"invalid": 2} and state.num_dead_lettered == 2
    resumed = LearnerPipeline(broker, dataset, tokenizer, DATA, BATCH, max_steps=6, state=state)
    assert state.consumed_group_ids == []  # converted
    assert set(state.admitted_unread) == {carried, unread, given_up}  # the carried and given-up ones adopted
    assert resumed.feeder.ledger.is_decided(trained) and resumed.feeder.ledger.is_decided("sft/e0/i9")
    resumed.max_steps = 2
    assert resumed.run(timeout_s=30)
    got = [g for step in resumed.trained for g in step]
    assert trained not in got and carried in got and state.num_duplicates == 1  # its pending entry came back
    assert len(got) == len(set(got)) == 4
