"""Request and response models of the reward service's HTTP API.

`POST /evaluate` is drop-in compatible with the LongTraceRL reward server (`launch_server.py`): unknown
top-level and `extra_reward_info` keys are ignored as there, `history` wins over `response`, and
assistant messages may carry any extra keys (slime's `ill_formed_content`, `truncated_content`, ...).
Where the reference would crash (HTTP 500) on a missing key we use the documented default instead, and
where it would crash on a wrong type we answer 422 with the reason. The `/v1/*` endpoints are ours and
reject unknown keys, so a typo never silently changes a reward.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.schemas import Status
from reward_service.config import CombinationRule
from reward_service.rubric import LONGRLVR, parse_chunk_ids

# A gold answer; NaN and infinities are refused (they could only ever be judged wrong).
Label = str | int | Annotated[float, Field(allow_inf_nan=False)]


class HistoryMessage(BaseModel):
    """One chat message. Only assistant messages are read: `content` (the answer) and `reasoning_content`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "if": {"properties": {"role": {"const": "assistant"}}},
            "then": {"properties": {"content": {"type": ["string", "null"]}}},
        },
    )

    role: str
    content: str | list[Any] | None = None
    """Assistant: the final answer (after </think>). Other roles may use OpenAI's list-of-parts form."""
    reasoning_content: str | None = None
    """Assistant: the thinking."""

    @model_validator(mode="after")
    def _assistant_text(self) -> HistoryMessage:
        if self.role == "assistant" and isinstance(self.content, list):
            raise ValueError("an assistant message's content must be a string")
        return self


class ExtraRewardInfo(BaseModel):
    """LongTraceRL's `metadata.extra_reward_info` plus the flags slime injects."""

    # The schema also says what the scorer checks: a question unless the judge is skipped (ratio 1).
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "anyOf": [
                {"required": ["question"], "properties": {"question": {"type": "string"}}},
                {"required": ["rubric_reward_ratio"], "properties": {"rubric_reward_ratio": {"const": 1}}},
            ]
        },
    )

    question: str | None = None
    """The question; required whenever the outcome is judged (rubric_reward_ratio < 1)."""
    rubrics: list[str | int] = []
    """Gold entities (or gold chunk ids for dataset_name "longrlvr")."""
    dataset_name: str = "longqa"
    """"longrlvr" selects the chunk F-beta variant; any other name the entity rubric."""
    rubric_reward_ratio: float | None = Field(None, ge=0, le=1)
    """η; None uses the service's configured `eta`. 0 skips the rubric, 1 skips the judge."""
    rubric_use_reasoning_content: bool | None = None
    """Scan the reasoning for rubric entities; None uses the service default."""
    rubric_use_content: bool | None = None
    """Scan the final answer for rubric entities; None uses the service default."""

    @model_validator(mode="after")
    def _chunk_ids(self) -> ExtraRewardInfo:
        if self.dataset_name == LONGRLVR:
            parse_chunk_ids(self.rubrics)  # the reference compares ints: a non-integer id could never hit
        return self


class _Response(BaseModel):
    """A response given as a chat `history` (the judged text is its last assistant message) or a `response`."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["history"]}, {"required": ["response"]}]})

    history: list[HistoryMessage] | None = Field(None, json_schema_extra={"minItems": 1})
    """Chat history; the last message must be the assistant's answer (else the sample scores 0, as the reference)."""
    response: str | None = None
    """The raw response text `<think>…</think>answer`; used when there is no history."""

    @model_validator(mode="after")
    def _one_form(self) -> _Response:
        if self.history is None and self.response is None:
            raise ValueError("either 'history' or 'response' is required")
        if self.history is not None and not self.history:
            raise ValueError("'history' must not be empty")
        return self


class EvaluateRequest(_Response):
    """Body of POST /evaluate (LongTraceRL reward server contract)."""

    model_config = ConfigDict(extra="ignore")

    label: Label
    """The gold answer."""
    extra_reward_info: ExtraRewardInfo


class FastMessage(msgspec.Struct):
    """HistoryMessage as a msgspec struct (fast_evaluate.py: POST /evaluate's bodies, no more lenient)."""

    role: str
    content: str | list[Any] | None = None
    reasoning_content: str | None = None


class FastInfo(msgspec.Struct):
    """ExtraRewardInfo as a msgspec struct."""

    question: str | None = None
    rubrics: list[str | int] = []
    dataset_name: str = "longqa"
    rubric_reward_ratio: float | None = None
    rubric_use_reasoning_content: bool | None = None
    rubric_use_content: bool | None = None


class FastEvaluateRequest(msgspec.Struct):
    """EvaluateRequest as a msgspec struct."""

    label: str | int | float
    extra_reward_info: FastInfo
    history: list[FastMessage] | None = None
    response: str | None = None


class EvaluateResponse(BaseModel):
    reward: float
    """(1−η)·outcome + η·rubric, or for longrlvr outcome + η·F + (1−η)·outcome·F (no group step)."""
    outcome_reward: float
    """Judge verdict: 1 or 0."""
    rubric_reward: float
    """Raw rubric reward r̂_rb (fraction of entities hit, or chunk F-beta)."""


class ScoreRequest(BaseModel):
    """Body of POST /v1/score: independent samples, each as an /evaluate body, scored concurrently."""

    model_config = ConfigDict(extra="forbid")

    samples: list[EvaluateRequest] = Field(min_length=1)


class ScoreResponse(BaseModel):
    results: list[EvaluateResponse]
    """One result per sample, in request order."""


class GroupSample(_Response):
    """One sample of a group, with what the rollout recorded about it."""

    model_config = ConfigDict(extra="forbid")

    status: Status = "completed"
    """completed, truncated (hit max_new_tokens) or aborted; the latter two score 0 in training mode."""
    ill_formed: bool = False
    """The message processor marked the response ill-formed (scores 0 in training mode)."""
    task_unfinished: bool = False
    """No stop token / turn not finished (scores 0 in training mode)."""


class ScoreGroupRequest(BaseModel):
    """Body of POST /v1/score_group: one prompt's samples; rubric rewards are normalised by the group maximum."""

    model_config = ConfigDict(extra="forbid")

    label: Label
    extra_reward_info: ExtraRewardInfo
    samples: list[GroupSample] = Field(min_length=1)
    combination: CombinationRule | None = None
    """Combination rule; None uses the service's configured rule."""
    normalize_rubric: bool | None = None
    """Group max-normalisation of the rubric reward; None uses the service default."""
    evaluation: bool = False
    """Evaluation mode: ill-formed, truncated and unfinished samples are scored instead of zeroed."""


class GroupSampleReward(BaseModel):
    reward: float
    """Final reward after normalisation and the combination rule."""
    outcome_reward: float
    rubric_reward: float
    """r_rb after group max-normalisation."""
    raw_rubric_reward: float
    """r̂_rb before normalisation."""
    zeroed_reason: str
    """Why the sample was set to 0 without judging (truncated, aborted, ill_formed, task_unfinished), else ""."""
    judge_s: float


class ScoreGroupResponse(BaseModel):
    rewards: list[GroupSampleReward]
    """One per sample, in request order."""
    max_raw_rubric_reward: float
    eta: float
    combination: CombinationRule


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    judge: str
