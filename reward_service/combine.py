"""Rewards of a group from its per-sample parts (METHOD.md §2, slime's `generate_and_rm_group`).

- Training mode zeroes samples that are truncated, aborted, ill-formed or unfinished (no judge call); they
  stay in the group and count in its rubric maximum with 0.
- M = max of the raw rubric rewards over ALL samples; r_rb = r̂_rb / M when M > 0.
- `longrlvr` samples: r = r_oc + η·F + (1−η)·r_oc·F, whatever the rule.
- positive_only (the paper): r = 0 if r_oc == 0 else (1−η)·r_oc + η·r_rb
- negative_only: r = r_oc if r_oc > 0 else η·r_rb
- both: r = (1−η)·r_oc + η·r_rb
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker.schemas import SampleReward, Status
from reward_service.config import CombinationRule
from reward_service.rubric import LONGRLVR


@dataclass(frozen=True, slots=True)
class SampleParts:
    """What scoring one sample produced, before the group step."""

    outcome: float  # r_oc in {0, 1}
    raw_rubric: float  # r̂_rb (entity fraction or chunk F-beta)
    zeroed_reason: str = ""  # set when the sample was zeroed without judging
    judge_s: float = 0.0


def zero_reason(status: Status, ill_formed: bool, task_unfinished: bool) -> str:
    """Why a sample gets reward 0 without a judge call in training mode ("" when it is scored)."""
    if status != "completed":
        return status
    if ill_formed:
        return "ill_formed"
    if task_unfinished:
        return "task_unfinished"
    return ""


def single_reward(outcome: float, rubric: float, eta: float, dataset_name: str) -> float:
    """The per-sample reward the reference /evaluate returns (no group step): linear in η, or longrlvr's formula."""
    if dataset_name == LONGRLVR:
        return outcome + eta * rubric + (1 - eta) * outcome * rubric
    return (1 - eta) * outcome + eta * rubric


def combine(outcome: float, rubric: float, eta: float, rule: CombinationRule, dataset_name: str) -> float:
    """The final reward of one sample from r_oc and the group-normalised r_rb."""
    if dataset_name == LONGRLVR:
        return single_reward(outcome, rubric, eta, dataset_name)
    if rule == "negative_only":
        return outcome if outcome > 0 else eta * rubric
    if rule == "positive_only":
        return 0.0 if outcome == 0 else (1 - eta) * outcome + eta * rubric
    assert rule == "both", rule
    return (1 - eta) * outcome + eta * rubric


def combine_group(
    parts: Sequence[SampleParts],
    eta: float,
    rule: CombinationRule,
    dataset_name: str,
    normalize: bool = True,
) -> list[SampleReward]:
    """Group max-normalisation of the rubric reward, then the combination rule; one SampleReward per sample."""
    assert 0.0 <= eta <= 1.0, eta
    max_rubric = max((p.raw_rubric for p in parts), default=0.0)
    scale = max_rubric if normalize and max_rubric > 0 else 1.0
    out: list[SampleReward] = []
    for p in parts:
        rubric = p.raw_rubric / scale
        out.append(
            SampleReward(
                reward=combine(p.outcome, rubric, eta, rule, dataset_name),
                outcome_reward=p.outcome,
                rubric_reward=rubric,
                raw_rubric_reward=p.raw_rubric,
                zeroed_reason=p.zeroed_reason,
                judge_s=p.judge_s,
            )
        )
    return out
