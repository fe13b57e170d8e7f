"""The feeder (learner rank 0): dataset rows -> chat-templated prompts -> Tasks on `tasks`, under admission control.

Admission control (AReaL-style, ARCHITECTURE.md "Staleness and asynchrony"): at policy version v at most
`(max_staleness + v + 1) * groups_per_step` groups are admitted in total, so generation runs at most
`max_staleness` versions ahead of training. Groups the learner drops (stale, zero-variance, dead-lettered)
give their slot back (the limit is raised by their count); otherwise a dropped group would leave a step
short of groups forever; so do groups lost upstream (dead-lettered, or vanished from Redis: upstream.py).
Every admitted group id is recorded with its admission version in `LearnerState.admitted_unread` until
its fate is decided (ledger.py): that is how the reader knows which groups are about to go stale and
fills a step oldest-first (scored_reader.py), and which groups may still arrive.

Order: epoch e visits the rows in the permutation of `numpy.random.default_rng([seed, e])` (dataset
order without shuffle). The cursor (epoch, position, admitted) lives in `LearnerState` and is
checkpointed; a resumed feeder republishes the tasks admitted after the checkpoint with the same group
ids (`run/e<epoch>/i<index>`), which the broker's dedup skips, so nothing is generated twice. The same
order tells which groups were admitted (`AdmissionOrder`), so the record of decided groups stays bounded.
The dataset is read through `datagen.dataset.parse_row` (the datagen loader's validation) from a
byte-offset index of the JSONL file, so a 1.2 GB dataset is not held in memory.

Prompt lengths: at start the feeder measures every row's prompt once (`prompt_lengths`: the ids `prompt_ids` sends)
and logs how many rows leave no room for a response under `--data.max_total_tokens` (those are skipped, every
epoch); it refuses to start (ConfigError) when no row does. The lengths (one int per row) are kept, so a skipped row
is never read or tokenized again; a row that fits is tokenized again when it is admitted (ids are not kept).
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from broker.base import Producer
from broker.schemas import RewardInfo, SamplingParams, Task, pack_ids
from common.config import ConfigError
from datagen.progress import Progress
from datagen.prompts import JsonlDataset, PromptTokenizer, prompt_ids
from learner.ledger import GroupLedger
from learner.state import DataCursor, LearnerState
from learner.train_config import DataConfig

logger = logging.getLogger(__name__)

SCAN_BATCH_CHARS = 4_000_000
"""Templated prompt text tokenized per call by the start-up scan (a fast tokenizer encodes a batch on all cores)."""
SCAN_PROGRESS_S = 10.0
"""The start-up scan shows progress on stderr once it has run this long."""


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> npt.NDArray[np.int64]:
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_rows).astype(np.int64)


def group_id(run_id: str, epoch: int, index: int) -> str:
    return f"{run_id}/e{epoch}/i{index}"


class _TemplatedText:
    """Stands in for the tokenizer inside `prompt_ids`: the chat template is the real one, the tokenization is only
    recorded (text and keyword arguments), so that `prompt_lengths` tokenizes what `prompt_ids` would, in batches."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self._tokenizer = tokenizer
        self.text = ""
        self.kwargs: dict[str, Any] = {}

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        return self._tokenizer.apply_chat_template(conversation, **kwargs)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.text, self.kwargs = text, kwargs
        return {"input_ids": []}


def prompt_lengths(
    dataset: JsonlDataset, tokenizer: PromptTokenizer, progress_after_s: float = SCAN_PROGRESS_S
) -> npt.NDArray[np.int64]:
    """`len(prompt_ids(tokenizer, dataset[i]))` for every row i: each row's chat template as `prompt_ids` applies it,
    the texts tokenized many at a time. Progress on stderr when it takes longer than `progress_after_s`."""
    lengths = np.empty(len(dataset), dtype=np.int64)
    progress = Progress("feeder: prompt lengths", total=len(dataset), interval_s=progress_after_s)
    start = time.monotonic()
    capture = _TemplatedText(tokenizer)
    texts: list[str] = []
    kwargs: dict[str, Any] = {}
    done = 0

    def flush() -> None:
        nonlocal done
        ids = cast(Any, tokenizer)(texts, **kwargs)["input_ids"]
        if len(ids) != len(texts):
            raise TypeError(f"the tokenizer turned {len(texts)} texts into {len(ids)} id lists")
        lengths[done : done + len(texts)] = [len(x) for x in ids]
        done += len(texts)
        progress.update(len(texts))
        texts.clear()

    chars = 0
    for index in range(len(dataset)):
        prompt_ids(capture, dataset[index])
        if texts and (capture.kwargs != kwargs or chars + len(capture.text) > SCAN_BATCH_CHARS):
            flush()
            chars = 0
        texts.append(capture.text)
        kwargs = capture.kwargs
        chars += len(capture.text)
    flush()
    if time.monotonic() - start >= progress_after_s:
        progress.close()  # progress was shown: end its line
    return lengths


class AdmissionOrder:
    """The feeder's order: epoch e visits the dataset rows in `epoch_order(num_rows, seed, e, shuffle)`; and, for
    the ledger (ledger.py, FeederOrder), where one of its group ids sits in it."""

    def __init__(self, run_id: str, num_rows: int, seed: int, shuffle: bool) -> None:
        self._run_id = run_id
        self._num_rows = num_rows
        self._seed = seed
        self._shuffle = shuffle
        self._orders: dict[int, npt.NDArray[np.int64]] = {}
        self._positions: dict[int, npt.NDArray[np.int64]] = {}

    def order(self, epoch: int) -> npt.NDArray[np.int64]:
        """Dataset row indices in the order epoch `epoch` visits them (the last two epochs asked are kept)."""
        got = self._orders.get(epoch)
        if got is None:
            got = self._orders[epoch] = epoch_order(self._num_rows, self._seed, epoch, self._shuffle)
            for old in sorted(self._orders)[:-2]:
                del self._orders[old]
        return got

    def position(self, epoch: int, index: int) -> int:
        pos = self._positions.get(epoch)
        if pos is None:
            pos = np.empty(self._num_rows, dtype=np.int64)
            pos[self.order(epoch)] = np.arange(self._num_rows, dtype=np.int64)
            self._positions[epoch] = pos
            for old in sorted(self._positions)[:-2]:
                del self._positions[old]
        return int(pos[index])

    def parse(self, gid: str) -> tuple[int, int] | None:
        head = f"{self._run_id}/e"
        if not gid.startswith(head):
            return None
        epoch, sep, index = gid[len(head) :].partition("/i")
        if not (sep and epoch.isascii() and epoch.isdigit() and index.isascii() and index.isdigit()):
            return None
        e, i = int(epoch), int(index)
        if i >= self._num_rows or group_id(self._run_id, e, i) != gid:
            return None  # not one of ours (another dataset, or a non-canonical spelling)
        return e, i


def admission_limit(state: LearnerState, cfg: DataConfig, max_groups: int | None = None) -> int:
    """Groups that may have been admitted in total at the current policy version: the staleness bound,
    capped at the groups the run will ever train (`max_groups`, so nothing is left untrained at the end),
    plus the slots given back by dropped groups."""
    bound = (cfg.max_staleness + state.policy_version + 1) * cfg.groups_per_step
    if max_groups is not None:
        bound = min(bound, max_groups)
    return bound + state.num_released


class Feeder:
    def __init__(
        self,
        dataset: JsonlDataset,
        tokenizer: PromptTokenizer,
        producer: Producer[Task],
        state: LearnerState,
        cfg: DataConfig,
        run_id: str,
        max_groups: int | None = None,
        ledger: GroupLedger | None = None,
    ) -> None:
        """`ledger`: the record of decided groups the reader shares (a new one over `state` and this order if None)."""
        self._max_groups = max_groups  # groups the run will train in all (max_steps * groups_per_step)
        self._dataset = dataset
        self._tokenizer = tokenizer
        self._producer = producer
        self._state = state
        self._cfg = cfg
        self._run_id = run_id
        self.admission = AdmissionOrder(run_id, len(dataset), cfg.seed, cfg.shuffle)
        self.ledger = ledger if ledger is not None else GroupLedger(state, self.admission)
        self._max_backlog: int | None = None
        self.prompt_lengths = self._scan()

    def _scan(self) -> npt.NDArray[np.int64]:
        """Every row's prompt length; one line on how many rows will be skipped for length; ConfigError if all."""
        start = time.monotonic()
        lengths = prompt_lengths(self._dataset, self._tokenizer)
        took = time.monotonic() - start
        cfg, n, path = self._cfg, len(lengths), self._dataset.path
        skipped = int(np.count_nonzero(lengths >= cfg.max_total_tokens))  # room = max_total_tokens - length < 1
        longest, shortest = int(lengths.max()), int(lengths.min())
        flag = f"--data.max_total_tokens {cfg.max_total_tokens}"
        tokenizer = getattr(self._tokenizer, "name_or_path", "") or "TOKENIZER_DIR"
        fit = (
            f"longtrace data fit {path} FITTED.jsonl --max_tokens M --tokenizer {tokenizer}, with M (the user "
            f"message's tokens) below {cfg.max_total_tokens} less the response budget (--data.max_new_tokens "
            f"{cfg.max_new_tokens})"
        )
        if skipped == n:
            raise ConfigError(
                f"{flag}: none of the {n} rows of {path} leaves room for a response (prompts of {shortest} to "
                f"{longest} tokens, chat template included): raise it above {shortest}, or trim the rows: {fit}"
            )
        if skipped:
            logger.warning(
                "prompt lengths: %d of %d rows of %s leave no room for a response under %s and will be skipped "
                "(longest prompt %d tokens; scanned in %.1f s); trim them to the budget first: %s",
                skipped,
                n,
                path,
                flag,
                longest,
                took,
                fit,
            )
        else:
            logger.info(
                "prompt lengths: all %d rows of %s fit under %s (longest prompt %d tokens; scanned in %.1f s)",
                n,
                path,
                flag,
                longest,
                took,
            )
        return lengths

    def set_max_backlog(self, max_backlog: int) -> None:
        """Never publish beyond the tasks stream's backlog limit (publishing would block rank 0)."""
        self._max_backlog = max_backlog

    @property
    def cursor(self) -> DataCursor:
        return self._state.cursor

    def fill(self) -> int:
        """Publish tasks until the admission limit (or the stream's backlog limit); return how many were admitted."""
        want = admission_limit(self._state, self._cfg, self._max_groups) - self.cursor.admitted
        if want > 0 and self._max_backlog is not None:
            want = min(want, self._max_backlog - self._producer.backlog())
        if want <= 0:
            return 0
        tasks = [self._next_task() for _ in range(want)]
        ids = self._producer.publish(tasks, dedup_key=lambda t: t.group_id)
        self.cursor.admitted += len(tasks)
        for t in tasks:  # the reader waits for admitted groups about to go stale (scored_reader.py, "due" groups)
            self.ledger.admit(t.group_id, t.policy_version)
        num_new = sum(i is not None for i in ids)
        if num_new < len(tasks):
            logger.info("%d of %d tasks were already published (resumed run)", len(tasks) - num_new, len(tasks))
        return len(tasks)

    def _next_task(self) -> Task:
        # The start-up scan found a row that fits, so the rest of this epoch and the whole next one hold one (a bound
        # of one pass would be wrong: the next epoch's shuffle may put that row after the current position).
        for _ in range(2 * len(self._dataset)):
            c = self.cursor
            if c.position >= len(self._dataset):
                c.epoch += 1
                c.position = 0
            index = int(self.admission.order(c.epoch)[c.position])
            c.position += 1
            task = self._task(index, c.epoch)
            if task is not None:
                return task
            c.num_skipped += 1
        raise RuntimeError(
            f"--data.max_total_tokens {self._cfg.max_total_tokens}: two passes over the {len(self._dataset)} rows "
            f"of {self._dataset.path} found none that leaves room for a response, though the start-up scan did "
            "(was the file changed?)"
        )

    def _task(self, index: int, epoch: int) -> Task | None:
        cfg = self._cfg
        if cfg.max_total_tokens - int(self.prompt_lengths[index]) < 1:
            return None  # counted in the start-up line; not read or tokenized again
        row = self._dataset[index]
        ids = prompt_ids(self._tokenizer, row)
        room = min(cfg.max_new_tokens, cfg.max_total_tokens - len(ids))
        if room < 1:  # only if the row changed since the scan
            logger.warning(
                "skipped row %d: its %d prompt tokens leave no room under --data.max_total_tokens %d",
                index,
                len(ids),
                cfg.max_total_tokens,
            )
            return None
        return Task(
            run_id=self._run_id,
            group_id=group_id(self._run_id, epoch, index),
            dataset_index=index,
            epoch=epoch,
            prompt_ids=pack_ids(ids),
            label=row.label,
            reward_info=RewardInfo(
                question=row.question,
                rubrics=[str(r) for r in row.rubrics],
                dataset_name=row.dataset_name,
                extra=dict(row.reward_extra),
            ),
            sampling=SamplingParams(
                max_new_tokens=room,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                stop_token_ids=list(cfg.stop_token_ids),
            ),
            num_samples=cfg.num_samples,
            policy_version=self._state.policy_version,
            created_s=time.time(),
        )
