"""Scoring: from a request or a stream group to rewards, with the reference's semantics (METHOD.md §2).

Per sample: the judged answer is the last assistant message's content (history mode) or the text after
the first </think> (response mode); the judge sees what follows its last </think>. The outcome is judged
when η < 1, the rubric computed when η > 0. Samples of a group are scored concurrently; the group step
(normalisation, combination rule) is `combine.combine_group`. The rubric of a long response runs off the event
loop and stops at the caller's `deadline.scoring_deadline`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from broker.schemas import Group, Sample, SampleReward
from reward_service.combine import SampleParts, combine_group, single_reward, zero_reason
from reward_service.config import RewardConfig
from reward_service.deadline import INLINE_MAX_CHARS, INLINE_MAX_RUBRICS, deadline_s, off_loop
from reward_service.judges.base import Judge
from reward_service.metrics import SAMPLES
from reward_service.rubric import Turn, judged_text, response_mode_turn, rubric_reward
from reward_service.schemas import (
    EvaluateRequest,
    EvaluateResponse,
    ExtraRewardInfo,
    FastEvaluateRequest,
    FastInfo,
    FastMessage,
    GroupSampleReward,
    HistoryMessage,
    ScoreGroupRequest,
    ScoreGroupResponse,
    ScoreRequest,
    ScoreResponse,
)

T = TypeVar("T")


class BadRequest(ValueError):
    """A request that parses but cannot be scored as asked (HTTP 422 with this message)."""


@dataclass(frozen=True, slots=True)
class RewardSpec:
    """Everything about a prompt that its samples' rewards depend on, with service defaults resolved."""

    label: str
    question: str
    rubrics: Sequence[str | int]
    dataset_name: str
    eta: float
    use_reasoning: bool
    use_content: bool


@dataclass(frozen=True, slots=True)
class Prepared:
    """A response reduced to what scoring reads."""

    turns: Sequence[Turn]  # assistant turns, for the rubric text
    answer: str | None  # the judged message's content; None: the sample scores 0 (no assistant answer)


def prepare_history(history: Sequence[HistoryMessage | FastMessage]) -> Prepared:
    last = history[-1]
    if last.role != "assistant" or not isinstance(last.content, str):
        return Prepared(turns=(), answer=None)
    turns = [
        Turn(reasoning=m.reasoning_content, content=m.content if isinstance(m.content, str) else None)
        for m in history
        if m.role == "assistant"
    ]
    return Prepared(turns=turns, answer=last.content)


def prepare_response(response: str) -> Prepared:
    turn, answer = response_mode_turn(response)
    return Prepared(turns=(turn,), answer=answer)


def prepare_sample(sample: Sample) -> Prepared:
    """A stream sample as slime's message processor would hand it to the reward server: keys only when
    non-empty, and no content at all for a truncated or aborted response."""
    if sample.status != "completed" or not sample.content:
        return Prepared(turns=(), answer=None)
    return Prepared(turns=(Turn(reasoning=sample.reasoning or None, content=sample.content),), answer=sample.content)


async def gather_or_cancel(aws: Iterable[Awaitable[T]]) -> list[T]:
    """All results in order; on the first failure the others are cancelled (and awaited) before it propagates."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Scorer:
    def __init__(self, judge: Judge, config: RewardConfig) -> None:
        self.judge = judge
        self.config = config

    def spec(self, label: str | int | float, info: ExtraRewardInfo | FastInfo) -> RewardSpec:
        eta = self.config.eta if info.rubric_reward_ratio is None else info.rubric_reward_ratio
        if eta < 1 and info.question is None:
            raise BadRequest(
                "extra_reward_info.question is required when the outcome is judged (rubric_reward_ratio < 1)"
            )
        return RewardSpec(
            label=str(label),
            question=info.question or "",
            rubrics=info.rubrics,
            dataset_name=info.dataset_name,
            eta=eta,
            use_reasoning=(
                self.config.rubric_use_reasoning_content
                if info.rubric_use_reasoning_content is None
                else info.rubric_use_reasoning_content
            ),
            use_content=self.config.rubric_use_content if info.rubric_use_content is None else info.rubric_use_content,
        )

    async def parts(self, prepared: Prepared, spec: RewardSpec) -> SampleParts:
        """r_oc and r̂_rb of one sample."""
        if prepared.answer is None:
            SAMPLES.labels("no_answer").inc()
            return SampleParts(outcome=0.0, raw_rubric=0.0, zeroed_reason="no_answer")
        rubric = 0.0
        if spec.eta > 0:
            rubric = await off_loop(
                _heavy(prepared.turns, spec.rubrics),
                rubric_reward,
                prepared.turns,
                spec.rubrics,
                spec.dataset_name,
                spec.use_reasoning,
                spec.use_content,
                deadline_s(),
            )
        outcome, judge_s = 0.0, 0.0
        if spec.eta < 1:
            judged = judged_text(prepared.answer)
            if judged.strip():  # an empty answer scores 0 without asking the judge
                start = time.perf_counter()
                outcome = 1.0 if await self.judge.judge(spec.question, spec.label, judged) else 0.0
                judge_s = time.perf_counter() - start
        SAMPLES.labels("scored").inc()
        return SampleParts(outcome=outcome, raw_rubric=rubric, judge_s=judge_s)

    async def evaluate(self, req: EvaluateRequest | FastEvaluateRequest) -> EvaluateResponse:
        spec = self.spec(req.label, req.extra_reward_info)
        prepared = prepare_history(req.history) if req.history is not None else prepare_response(req.response or "")
        p = await self.parts(prepared, spec)
        return EvaluateResponse(
            reward=single_reward(p.outcome, p.raw_rubric, spec.eta, spec.dataset_name),
            outcome_reward=p.outcome,
            rubric_reward=p.raw_rubric,
        )

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._check_batch(len(req.samples))
        return ScoreResponse(results=await gather_or_cancel(self.evaluate(s) for s in req.samples))

    async def score_group_request(self, req: ScoreGroupRequest) -> ScoreGroupResponse:
        self._check_batch(len(req.samples))
        spec = self.spec(req.label, req.extra_reward_info)

        parts = await gather_or_cancel(
            self._group_sample(
                prepare_history(s.history) if s.history is not None else prepare_response(s.response or ""),
                "" if req.evaluation else zero_reason(s.status, s.ill_formed, s.task_unfinished),
                spec,
            )
            for s in req.samples
        )
        rule = req.combination or self.config.combination
        normalize = self.config.normalize_rubric if req.normalize_rubric is None else req.normalize_rubric
        rewards = combine_group(parts, spec.eta, rule, spec.dataset_name, normalize)
        return ScoreGroupResponse(
            rewards=[_group_sample_reward(r) for r in rewards],
            max_raw_rubric_reward=max(p.raw_rubric for p in parts),
            eta=spec.eta,
            combination=rule,
        )

    async def score_group(self, group: Group, evaluation: bool = False) -> list[SampleReward]:
        """Rewards of a stream group; ValueError (a pydantic ValidationError or BadRequest) when its task's
        reward info cannot be scored, JudgeError when the judge fails."""
        task = group.task
        info = ExtraRewardInfo.model_validate(
            {
                **task.reward_info.extra,
                "question": task.reward_info.question,
                "rubrics": task.reward_info.rubrics,
                "dataset_name": task.reward_info.dataset_name,
            }
        )
        spec = self.spec(task.label, info)
        parts = await gather_or_cancel(
            self._group_sample(
                prepare_sample(s), "" if evaluation else zero_reason(s.status, s.ill_formed, s.task_unfinished), spec
            )
            for s in group.samples
        )
        return combine_group(parts, spec.eta, self.config.combination, spec.dataset_name, self.config.normalize_rubric)

    async def _group_sample(self, prepared: Prepared, reason: str, spec: RewardSpec) -> SampleParts:
        if reason:
            SAMPLES.labels("zeroed").inc()
            return SampleParts(outcome=0.0, raw_rubric=0.0, zeroed_reason=reason)
        return await self.parts(prepared, spec)

    def _check_batch(self, n: int) -> None:
        if n > self.config.max_batch:
            raise BadRequest(f"{n} samples in one request; at most {self.config.max_batch} (--max_batch)")


def _heavy(turns: Sequence[Turn], rubrics: Sequence[str | int]) -> bool:
    """Whether a rubric computation is long enough to run off the event loop."""
    chars = sum(len(t.reasoning or "") + len(t.content or "") for t in turns)
    return chars > INLINE_MAX_CHARS or len(rubrics) > INLINE_MAX_RUBRICS


def _group_sample_reward(r: SampleReward) -> GroupSampleReward:
    return GroupSampleReward(
        reward=r.reward,
        outcome_reward=r.outcome_reward,
        rubric_reward=r.rubric_reward,
        raw_rubric_reward=r.raw_rubric_reward,
        zeroed_reason=r.zeroed_reason,
        judge_s=r.judge_s,
    )
