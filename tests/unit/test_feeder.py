"""The feeder: chat-templated prompts, deterministic shuffled order, admission control, resume (memory broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.base import TASKS
from broker.memory import MemoryBroker
from broker.schemas import Task
from broker.settings import BrokerConfig
from datagen.dataset import make_row, write_rows
from datagen.prompts import JsonlDataset
from learner.feeder import Feeder, admission_limit
from learner.state import LearnerState
from learner.train_config import DataConfig

NUM_ROWS = 7


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from rollout_server.models import build_bpe_tokenizer

    return build_bpe_tokenizer(300, ["the river rises in the hills and flows to the sea " * 20])


@pytest.fixture
def dataset(tmp_path: Path) -> JsonlDataset:
    rows = [
        make_row(
            f"Documents: <section>doc {i}</section> Question {i}?",
            f"answer {i}",
            f"question {i}",
            [f"entity {i}", "river"],
            "longqa",
            reward_extra={"row": i},
        )
        for i in range(NUM_ROWS)
    ]
    path = tmp_path / "data.jsonl"
    write_rows(path, rows)
    return JsonlDataset(path)


def _feeder(dataset: JsonlDataset, tokenizer: Any, broker: MemoryBroker, state: LearnerState, **cfg: Any) -> Feeder:
    data = DataConfig(**({"groups_per_step": 2, "max_staleness": 1, "num_samples": 4, "seed": 3} | cfg))
    return Feeder(dataset, tokenizer, broker.producer(TASKS, Task), state, data, run_id="run")


def _drain(broker: MemoryBroker) -> list[Task]:
    consumer = broker.consumer(TASKS, Task, group="workers", name="w")
    entries = consumer.read(1000, 0.05)
    consumer.ack([e.id for e in entries])
    return [e.msg for e in entries]


def test_admission_control_bounds_groups_in_flight(dataset: JsonlDataset, tokenizer: Any) -> None:
    """Guards against the feeder running ahead of training by more than max_staleness versions: at version v at
    most (max_staleness + v + 1) * groups_per_step groups in total, more only as v grows or groups are dropped."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState()
    feeder = _feeder(dataset, tokenizer, broker, state)
    assert feeder.fill() == 4  # (1 + 0 + 1) * 2
    assert feeder.fill() == 0
    assert len(_drain(broker)) == 4
    state.policy_version = 1
    assert feeder.fill() == 2 and state.cursor.admitted == 6 == admission_limit(state, feeder._cfg)
    state.num_dropped_stale = 1  # a dropped group gives its slot back
    assert feeder.fill() == 1
    assert [t.policy_version for t in _drain(broker)] == [1, 1, 1]


def test_admission_never_exceeds_what_the_run_will_train(dataset: JsonlDataset, tokenizer: Any) -> None:
    """Guards against the feeder admitting groups past max_steps * groups_per_step: they would be generated
    and scored but never trained, left pending in `scored` when the run ends."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState()
    data = DataConfig(groups_per_step=2, max_staleness=2, num_samples=4, seed=3)
    feeder = Feeder(dataset, tokenizer, broker.producer(TASKS, Task), state, data, run_id="run", max_groups=4)
    assert feeder.fill() == 4  # the staleness bound alone would allow (2 + 0 + 1) * 2 = 6
    state.policy_version = 5
    assert feeder.fill() == 0
    state.num_dropped_stale = 1  # a dropped group is replaced, so the run still trains max_groups
    assert feeder.fill() == 1


def test_tasks_carry_the_chat_templated_prompt_and_reward_info(dataset: JsonlDataset, tokenizer: Any) -> None:
    """Guards against prompts published without the chat template's generation prompt, a wrong response budget,
    and reward info (question, rubrics, extras) not reaching the reward service."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    _feeder(dataset, tokenizer, broker, LearnerState(), max_new_tokens=50, max_total_tokens=10_000).fill()
    task = _drain(broker)[0]
    row = dataset[task.dataset_index]
    text = tokenizer.decode(task.prompt_ids_np().tolist())
    assert text.startswith("<|im_start|>user\n" + row.prompt)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert task.label == row.label and task.num_samples == 4
    assert task.reward_info.question == row.question and task.reward_info.rubrics == [str(r) for r in row.rubrics]
    assert task.reward_info.extra == {"row": task.dataset_index}
    assert task.sampling.max_new_tokens == 50 and task.sampling.temperature == 1.0
    assert task.group_id == f"run/e0/i{task.dataset_index}"


def test_order_is_a_seeded_shuffle_per_epoch(dataset: JsonlDataset, tokenizer: Any) -> None:
    """Guards against a non-deterministic order (a resumed run would admit different prompts), the same order in
    every epoch, and rows skipped or repeated within an epoch."""

    def order(seed: int) -> list[tuple[int, int]]:
        broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
        state = LearnerState(policy_version=100)
        _feeder(dataset, tokenizer, broker, state, seed=seed, groups_per_step=1, max_staleness=0).fill()
        return [(t.epoch, t.dataset_index) for t in _drain(broker)][: 2 * NUM_ROWS]

    a = order(3)
    assert a == order(3)
    e0, e1 = [i for e, i in a if e == 0], [i for e, i in a if e == 1]
    assert sorted(e0) == sorted(e1) == list(range(NUM_ROWS))
    assert e0 != e1 and e0 != list(range(NUM_ROWS))
    assert [i for e, i in order(4) if e == 0] != e0


def test_resume_republishes_nothing_and_continues_in_order(dataset: JsonlDataset, tokenizer: Any) -> None:
    """Guards against a resumed feeder generating the tasks admitted after the checkpoint a second time (same
    group ids must be deduplicated) or skipping ahead of the uninterrupted order."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState()
    feeder = _feeder(dataset, tokenizer, broker, state)
    feeder.fill()
    checkpoint = LearnerState.load(_save(state, dataset.path.parent / "s.json"))
    state.policy_version = 2
    feeder.fill()  # admitted after the checkpoint, then the learner crashes
    uninterrupted = [t.group_id for t in _drain(broker)]
    assert len(uninterrupted) == 8

    checkpoint.policy_version = 2
    resumed = _feeder(dataset, tokenizer, broker, checkpoint)
    assert resumed.fill() == 4
    assert _drain(broker) == []  # the 4 republished tasks were deduplicated
    checkpoint.policy_version = 3
    resumed.fill()
    reference = MemoryBroker(BrokerConfig(redis_url="memory://"))
    _feeder(dataset, tokenizer, reference, LearnerState(policy_version=3)).fill()
    assert [t.group_id for t in _drain(broker)] == [t.group_id for t in _drain(reference)][8:]


def _save(state: LearnerState, path: Path) -> Path:
    state.save(path)
    return path


def test_prompts_without_room_are_skipped_and_backlog_caps_publishing(tmp_path: Path, tokenizer: Any) -> None:
    """Guards against publishing a task whose prompt already fills the context (the engine would reject it),
    looping forever when no row fits, and blocking rank 0 on a full tasks stream (publish up to the backlog limit)."""
    rows = [make_row("short?", "a", "q", [], "longqa"), make_row("long " * 200 + "?", "a", "q", [], "longqa")]
    write_rows(tmp_path / "d.jsonl", rows)
    dataset = JsonlDataset(tmp_path / "d.jsonl")
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState()
    _feeder(dataset, tokenizer, broker, state, max_total_tokens=100, shuffle=False).fill()
    assert {t.dataset_index for t in _drain(broker)} == {0}
    assert state.cursor.num_skipped == 3 and state.cursor.admitted == 4  # 4 epochs of [fits, skipped]
    with pytest.raises(ValueError, match="--data.max_total_tokens"):
        _feeder(dataset, tokenizer, broker, LearnerState(), max_total_tokens=5).fill()

    capped = MemoryBroker(BrokerConfig(redis_url="memory://", max_backlog=3))
    feeder = _feeder(dataset, tokenizer, capped, LearnerState(), max_total_tokens=100)
    feeder.set_max_backlog(3)
    assert feeder.fill() == 3
    assert feeder.fill() == 0


def test_missing_dataset_names_the_flag(tmp_path: Path) -> None:
    """Guards against a typo'd dataset path failing deep inside the feeder instead of naming the flag."""
    with pytest.raises(ValueError, match="--data.dataset_path"):
        JsonlDataset(tmp_path / "nope.jsonl")


def test_admissions_are_recorded_with_their_version_until_read_and_survive_a_checkpoint(
    dataset: JsonlDataset, tokenizer: Any, redis_url: str, tmp_path: Path
) -> None:
    """Guards against the reader not knowing which admitted groups are still out and how old they are (it could not
    wait for the ones about to go stale, so they would be overtaken and dropped), and against that record being
    lost with a restart (real redis-server)."""
    from broker.factory import connect

    broker = connect(BrokerConfig(redis_url=redis_url, run_id="feeder-due", socket_timeout_s=5, connect_timeout_s=2))
    state = LearnerState()
    data = DataConfig(groups_per_step=2, max_staleness=1, num_samples=4, seed=3)
    feeder = Feeder(dataset, tokenizer, broker.producer(TASKS, Task), state, data, run_id="run")
    assert feeder.fill() == 4
    state.policy_version = 1
    assert feeder.fill() == 2
    consumer = broker.consumer(TASKS, Task, group="workers", name="w")
    tasks = [e.msg for e in consumer.read(100, 0.2)]
    assert len(tasks) == 6
    assert state.admitted_unread == {t.group_id: t.policy_version for t in tasks}
    assert sorted(state.admitted_unread.values()) == [0, 0, 0, 0, 1, 1]
    restored = LearnerState.load(_save(state, tmp_path / "s.json"))
    assert restored.admitted_unread == state.admitted_unread
    broker.close()


def test_admission_order_places_only_the_feeders_own_group_ids(dataset: JsonlDataset, tokenizer: Any) -> None:
    """Guards the bounded record of decided groups (ledger.py): it reads a group's place in the feeder's order from
    its id, so an id of another run, a row the dataset does not have, a non-canonical spelling ("e01") or non-ASCII
    digits ("²") must not be taken for one of the feeder's, and every admitted id must map to its own place."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState(policy_version=100)
    feeder = _feeder(dataset, tokenizer, broker, state, groups_per_step=1, max_staleness=0)
    feeder.fill()
    order = feeder.admission
    for position, task in enumerate(_drain(broker)[: 2 * NUM_ROWS]):
        epoch, index = order.parse(task.group_id) or (-1, -1)
        assert (epoch, index) == (task.epoch, task.dataset_index)
        assert order.position(epoch, index) == position % NUM_ROWS
    for other in ["other/e0/i1", "run/e0/i99", "run/e01/i1", "run/e0/i01", "run/e²/i1", "run/e0/i1/x", "run/sft/e0/i1"]:
        assert order.parse(other) is None, other
