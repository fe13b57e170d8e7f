"""The feeder's start-up scan of prompt lengths: one line on the rows `--data.max_total_tokens` leaves no room for,
a refusal (ConfigError, exit 2) when it leaves room for none, and the lengths reused at fill time (memory broker,
the real BPE tokenizer and dataset helpers of test_feeder.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.base import TASKS
from broker.memory import MemoryBroker
from broker.schemas import Task
from broker.settings import BrokerConfig
from common.cli import guarded
from common.config import ConfigError
from datagen.dataset import make_row, write_rows
from datagen.prompts import JsonlDataset, prompt_ids
from learner import feeder as feeder_module
from learner.feeder import Feeder, epoch_order, prompt_lengths
from learner.state import LearnerState
from learner.train_config import DataConfig

WORDS = [3, 40, 5, 120, 8, 60, 200, 1]  # words of filler per row: prompts of very different lengths


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from rollout_server.models import build_bpe_tokenizer

    return build_bpe_tokenizer(300, ["the river rises in the hills and flows to the sea " * 20])


def _dataset(path: Path, words: list[int]) -> JsonlDataset:
    rows = [
        make_row("river " * n + f"question {i}?", f"a{i}", f"q{i}", [f"e{i}"], "longqa") for i, n in enumerate(words)
    ]
    write_rows(path, rows)
    return JsonlDataset(path)


@pytest.fixture
def dataset(tmp_path: Path) -> JsonlDataset:
    return _dataset(tmp_path / "data.jsonl", WORDS)


def _lengths(dataset: JsonlDataset, tokenizer: Any) -> list[int]:
    return [len(prompt_ids(tokenizer, dataset[i])) for i in range(len(dataset))]


def _feeder(dataset: JsonlDataset, tokenizer: Any, broker: MemoryBroker, state: LearnerState, **cfg: Any) -> Feeder:
    data = DataConfig(**({"groups_per_step": 4, "max_staleness": 0, "num_samples": 2, "seed": 3} | cfg))
    return Feeder(dataset, tokenizer, broker.producer(TASKS, Task), state, data, run_id="run")


def _drain(broker: MemoryBroker) -> list[Task]:
    consumer = broker.consumer(TASKS, Task, group="workers", name="w")
    entries = consumer.read(10_000, 0.05)
    consumer.ack([e.id for e in entries])
    return [e.msg for e in entries]


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "learner.feeder" and r.levelno == level]


class _CountingTokenizer:
    """The real tokenizer, counting the prompts templated through it."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.templated = 0

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        self.templated += 1
        return self._tokenizer.apply_chat_template(conversation, **kwargs)

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        return self._tokenizer(text, **kwargs)


def test_scan_measures_the_prompt_ids_the_feeder_sends(
    dataset: JsonlDataset, tokenizer: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards against the batched scan measuring something other than `prompt_ids` (another template, special tokens
    added, rows shifted between batches), which would skip rows that fit or admit rows that do not; and against a
    long scan running silently (progress on stderr) or a short one printing progress."""
    expected = _lengths(dataset, tokenizer)
    assert len(set(expected)) == len(expected)
    assert prompt_lengths(dataset, tokenizer).tolist() == expected
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(feeder_module, "SCAN_BATCH_CHARS", 300)  # several batches, of uneven sizes
    assert prompt_lengths(dataset, tokenizer, progress_after_s=0.0).tolist() == expected
    assert f"feeder: prompt lengths: {len(WORDS)}/{len(WORDS)}" in capsys.readouterr().err


def test_rows_too_long_are_counted_in_one_line_and_never_admitted(
    dataset: JsonlDataset, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards against a user with a small --data.max_total_tokens learning only mid-run (or never) that rows are
    skipped: one warning at start counts them exactly (a row whose prompt is exactly the budget is skipped, room 0),
    names the flag and the longest prompt, and points to `longtrace data fit`; the skipped rows are then never
    admitted, in any epoch, nor templated or tokenized again at fill time (the scan's lengths are reused)."""
    lengths = _lengths(dataset, tokenizer)
    budget = sorted(lengths)[4]  # the 4 shorter rows fit; the row of exactly `budget` tokens and the 3 longer do not
    fits = {i for i, n in enumerate(lengths) if n < budget}
    assert len(fits) == 4
    counting = _CountingTokenizer(tokenizer)
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState(policy_version=9)  # admits (0 + 9 + 1) * 4 = 40 tasks: 10 epochs of the 4 rows that fit
    caplog.set_level(logging.DEBUG, logger="learner.feeder")
    feeder = _feeder(dataset, counting, broker, state, max_total_tokens=budget, max_new_tokens=10_000)
    [line] = _records(caplog, logging.WARNING)
    assert f"4 of {len(WORDS)} rows of {dataset.path}" in line
    assert f"--data.max_total_tokens {budget}" in line and f"longest prompt {max(lengths)} tokens" in line
    assert f"longtrace data fit {dataset.path}" in line and "--max_tokens" in line
    assert feeder.prompt_lengths.dtype == np.int64 and feeder.prompt_lengths.tolist() == lengths

    counting.templated = 0
    caplog.clear()
    assert feeder.fill() == 40
    tasks = _drain(broker)
    assert {t.dataset_index for t in tasks} == fits
    assert {t.epoch for t in tasks} == set(range(10))
    last_epoch = epoch_order(len(WORDS), 3, 9, True)[: state.cursor.position].tolist()  # up to its last row that fits
    assert state.cursor.num_skipped == 4 * 9 + sum(i not in fits for i in last_epoch)  # 9 whole epochs, then that
    assert counting.templated == 40  # only the admitted rows
    assert all(t.sampling.max_new_tokens == budget - lengths[t.dataset_index] for t in tasks)
    assert _records(caplog, logging.WARNING) == []  # the start-up line said it once


def test_a_prompt_one_token_under_the_budget_is_admitted(dataset: JsonlDataset, tokenizer: Any) -> None:
    """Guards against an off-by-one in the scan's skip rule: room = max_total_tokens - prompt length; a row with room
    1 must be admitted (with max_new_tokens 1), as the fill-time rule always did."""
    lengths = _lengths(dataset, tokenizer)
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState(policy_version=1)  # (0 + 1 + 1) * 4 = 8 tasks: one epoch, in dataset order
    feeder = _feeder(dataset, tokenizer, broker, state, max_total_tokens=max(lengths) + 1, shuffle=False)
    assert feeder.fill() == len(WORDS)
    tasks = _drain(broker)
    assert [t.dataset_index for t in tasks] == list(range(len(WORDS))) and state.cursor.num_skipped == 0
    assert tasks[lengths.index(max(lengths))].sampling.max_new_tokens == 1


def test_no_row_too_long_logs_no_warning(
    dataset: JsonlDataset, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards against a warning (or a suggestion to trim the dataset) on a run whose rows all fit: one info line."""
    caplog.set_level(logging.DEBUG, logger="learner.feeder")
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    feeder = _feeder(dataset, tokenizer, broker, LearnerState(), max_total_tokens=100_000)
    assert _records(caplog, logging.WARNING) == []
    [line] = [m for m in _records(caplog, logging.INFO) if m.startswith("prompt lengths")]
    assert f"all {len(WORDS)} rows" in line and "--data.max_total_tokens 100000" in line
    assert feeder.fill() == 4


def test_all_rows_too_long_refuses_to_start(
    dataset: JsonlDataset, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards against a run whose budget fits no row starting anyway (today: failing only at the first fill, after
    the model is built): a ConfigError (exit 2 with the message, no traceback) naming the flag, the row count and
    the prompt lengths, before anything is published."""
    lengths = _lengths(dataset, tokenizer)
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    budget = min(lengths)  # the shortest prompt is exactly the budget: room 0
    with pytest.raises(ConfigError) as err:
        _feeder(dataset, tokenizer, broker, LearnerState(), max_total_tokens=budget)
    message = str(err.value)
    assert message.startswith(f"--data.max_total_tokens {budget}: none of the {len(WORDS)} rows")
    assert f"prompts of {min(lengths)} to {max(lengths)} tokens" in message and "longtrace data fit" in message
    assert _drain(broker) == []

    def start() -> int:
        _feeder(dataset, tokenizer, broker, LearnerState(), max_total_tokens=budget)
        return 0

    assert guarded("longtrace", start) == 2
    assert "longtrace: error: --data.max_total_tokens" in capsys.readouterr().err


def test_a_reshuffled_epoch_does_not_fail_a_dataset_that_has_a_fitting_row(tmp_path: Path, tokenizer: Any) -> None:
    """Guards against the old lazy check (one pass of skipped rows in a row = no row fits) failing a run that has
    rows that fit: across an epoch boundary the next epoch's shuffle can put the fitting row after the position
    where the pass started, so len(dataset) skips in a row happen though a row fits."""
    dataset = _dataset(tmp_path / "two.jsonl", [1, 200])
    lengths = _lengths(dataset, tokenizer)
    seed = 14
    assert [epoch_order(2, seed, e, True).tolist() for e in range(2)] == [[0, 1], [1, 0]]  # fits, long | long, fits
    broker = MemoryBroker(BrokerConfig(redis_url="memory://"))
    state = LearnerState(policy_version=2)
    feeder = _feeder(dataset, tokenizer, broker, state, max_total_tokens=lengths[1], seed=seed, groups_per_step=2)
    assert feeder.fill() == 6
    tasks = _drain(broker)
    assert [t.dataset_index for t in tasks] == [0] * 6 and [t.epoch for t in tasks] == list(range(6))
    assert state.cursor.num_skipped >= 5
