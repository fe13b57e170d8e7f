"""Hand-made scored groups for the learner's reader and batching tests: one weight segment at `version`."""

from __future__ import annotations

from broker.schemas import (
    Group,
    RewardInfo,
    Sample,
    SampleReward,
    ScoredGroup,
    Task,
    WeightSegment,
    pack_ids,
    pack_logprobs,
)


def make_scored(
    gid: str,
    version: int,
    rewards: list[float] | tuple[float, ...],
    prompt: list[int] | None = None,
    resp_len: int = 3,
    run_id: str = "r",
) -> ScoredGroup:
    """A group admitted and generated at `version`, one sample per reward (outcome 1 where the reward is > 0)."""
    task = Task(
        run_id=run_id,
        group_id=gid,
        dataset_index=0,
        prompt_ids=pack_ids(prompt or [1, 2]),
        label="x",
        reward_info=RewardInfo(question="q"),
        num_samples=len(rewards),
        policy_version=version,
    )
    samples = [
        Sample(
            response_ids=pack_ids([10 + i] * resp_len),
            logprobs=pack_logprobs([-0.5] * resp_len),
            text="t",
            finish_reason="stop",
            status="completed",
            weight_segments=[WeightSegment(0, version)],
        )
        for i in range(len(rewards))
    ]
    return ScoredGroup(
        group=Group(task=task, samples=samples),
        rewards=[SampleReward(reward=r, outcome_reward=float(r > 0), rubric_reward=r / 2) for r in rewards],
    )
