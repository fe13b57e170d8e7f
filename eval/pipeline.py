"""The eval's per-question pipeline: prompt ids -> k samples through the rollout worker's SampleGenerator ->
parsed by its message processor -> scored (eval/scoring.py) -> SampleRecords, a bounded number of questions at once."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from broker.schemas import RewardInfo, Sample, Task, pack_ids
from eval.config import EvalConfig
from eval.run import EvalError, Inputs, SampleRecord
from eval.scoring import RewardClient, score_request

log = logging.getLogger(__name__)

PROMPT_TOO_LONG = "prompt_too_long"
_PROGRESS_EVERY_S = 30.0


def sample_seed(seed: int, question_index: int, sample_index: int) -> int:
    """A 63-bit sampling seed per (question, sample): reproducible runs, independent samples."""
    digest = hashlib.sha256(f"{seed}:{question_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Pipeline:
    """Runs every question through generate -> parse -> score, a bounded number at once."""

    def __init__(
        self,
        cfg: EvalConfig,
        inputs: Inputs,
        rollout_cfg: Any,
        generator: Any,
        reward: RewardClient,
        on_question: Callable[[list[SampleRecord]], None] | None,
        keep_responses: bool,
    ) -> None:
        self.cfg = cfg
        self.dataset = inputs.dataset
        self.ids = inputs.ids
        self.tokenizer = inputs.tokenizer
        self.processor = inputs.processor
        self.rollout_cfg = rollout_cfg
        self.generator = generator
        self.reward = reward
        self.on_question = on_question
        self.keep_responses = keep_responses
        # Enough questions in flight to keep every engine slot busy while others are being scored.
        slots = 2 * math.ceil(cfg.concurrency * len(rollout_cfg.engines.urls) / cfg.k)
        self._slots = asyncio.Semaphore(max(2, slots))
        # One tokenizer thread: a fast tokenizer is not safe to call from several threads at once.
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-tokenize")
        self._done = self._correct = self._samples = 0
        self._next_log = time.monotonic() + _PROGRESS_EVERY_S
        # a bar on a terminal only (disable=None: off when stderr is not a TTY), beside the periodic log line
        self._bar = tqdm(total=len(self.ids), desc="eval", unit="question", disable=None, leave=False)

    async def run(self) -> list[SampleRecord]:
        from reward_service.scoring import gather_or_cancel
        from rollout_server.worker.generation import SampleFailed, SampleRejected

        try:
            per_question = await gather_or_cancel(self._question(i) for i in range(len(self.ids)))
        except (SampleFailed, SampleRejected) as e:
            raise EvalError(str(e)) from e
        finally:
            self._tok_pool.shutdown(wait=False, cancel_futures=True)
            self._bar.close()
        return [r for records in per_question for r in records]

    async def _question(self, index: int) -> list[SampleRecord]:
        from datagen.prompts import prompt_ids
        from reward_service.scoring import gather_or_cancel
        from rollout_server.worker.generation import TaskRejected, plan_group

        async with self._slots:
            row = self.dataset[index]
            ids = await asyncio.get_running_loop().run_in_executor(self._tok_pool, prompt_ids, self.tokenizer, row)
            task = Task(
                run_id="eval",
                group_id=f"q{index}",
                dataset_index=index,
                prompt_ids=pack_ids(ids),
                label=row.label,
                reward_info=RewardInfo(question=row.question),
                policy_version=0,
            )
            try:
                plan = plan_group(task, self.rollout_cfg, self.processor)
            except TaskRejected as e:
                log.warning("question %s: %s; its samples count wrong", self.ids[index], e)
                records = [self._unsent(index, row, len(ids), j) for j in range(self.cfg.k)]
            else:
                samples = await gather_or_cancel(self._generate(plan, index, j) for j in range(self.cfg.k))
                records = await self._score(index, row, len(ids), samples)
        self._progress(records)
        if self.on_question is not None:
            self.on_question(records)
        if not self.keep_responses:
            records = [dataclasses.replace(r, response="", answer="") for r in records]
        return records

    async def _generate(self, plan: Any, index: int, j: int) -> Sample:
        params = {**plan.sampling_params, "sampling_seed": sample_seed(self.cfg.seed, index, j)}
        sample: Sample = await self.generator.generate_sample(
            dataclasses.replace(plan, sampling_params=params), f"eval-q{index}-s{j}"
        )
        return sample

    async def _score(self, index: int, row: Any, prompt_len: int, samples: list[Sample]) -> list[SampleRecord]:
        ok = [s.status == "completed" and not s.ill_formed and not s.task_unfinished for s in samples]
        judged = [score_request(row, s) for s, good in zip(samples, ok, strict=True) if good]
        results = iter(await self.reward.score(judged) if judged else [])
        records = []
        for j, (s, good) in enumerate(zip(samples, ok, strict=True)):
            res = next(results) if good else {}
            outcome, rubric = float(res.get("outcome_reward", 0.0)), float(res.get("rubric_reward", 0.0))
            records.append(
                SampleRecord(
                    id=self.ids[index],
                    question_index=index,
                    question=row.question,
                    label=row.label,
                    dataset_name=row.dataset_name,
                    sample_index=j,
                    response=s.text,
                    answer=s.content,
                    well_formed=good,
                    finished=not s.task_unfinished,
                    status=s.status,
                    outcome=outcome,
                    rubric=rubric,
                    reward=outcome,
                    prompt_tokens=prompt_len,
                    response_tokens=len(s.response_ids_np()),
                    weight_version=s.oldest_policy_version,
                    engine=s.engine_id,
                    gen_s=round(s.gen_s, 3),
                    weight_version_newest=max((seg.policy_version for seg in s.weight_segments), default=None),
                )
            )
        return records

    def _unsent(self, index: int, row: Any, prompt_len: int, j: int) -> SampleRecord:
        return SampleRecord(
            id=self.ids[index],
            question_index=index,
            question=row.question,
            label=row.label,
            dataset_name=row.dataset_name,
            sample_index=j,
            response="",
            answer="",
            well_formed=False,
            finished=False,
            status="truncated",
            outcome=0.0,
            rubric=0.0,
            reward=0.0,
            prompt_tokens=prompt_len,
            response_tokens=0,
            weight_version=None,
            engine="",
            gen_s=0.0,
            error=PROMPT_TOO_LONG,
        )

    def _progress(self, records: list[SampleRecord]) -> None:
        self._done += 1
        self._bar.update()
        self._samples += len(records)
        self._correct += sum(r.outcome >= 0.5 for r in records)
        now = time.monotonic()
        if now >= self._next_log or self._done == len(self.ids):
            self._next_log = now + _PROGRESS_EVERY_S
            log.info(
                "%d/%d questions, %d samples, accuracy so far %.3f",
                self._done,
                len(self.ids),
                self._samples,
                self._correct / max(1, self._samples),
            )
