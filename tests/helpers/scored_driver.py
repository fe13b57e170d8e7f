"""A stand-in for the rollout workers and the reward service in learner tests: a thread that turns every task
on the broker's TASKS stream into a scored group on SCORED, deterministically (token ids, engine logprobs and
rewards derived from the group id), in task order, so two runs over the same tasks see the same data.

Used by tests/integration/test_trainer_resume.py and test_deploy_multinode.py, where the learner runs for real
(torchrun ranks, the learner CLI) and what it is fed is beside the point.
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np

from broker.base import SCORED, TASKS
from broker.factory import connect
from broker.schemas import Group, Sample, SampleReward, ScoredGroup, Task, WeightSegment, pack_ids, pack_logprobs
from broker.settings import BrokerConfig

READ_COUNT = 8  # tasks taken per read


def scored_group(task: Task, alternate_rewards: bool = False) -> ScoredGroup:
    """`task`'s group of `num_samples` short responses (2-6 tokens, logprobs near -5.5), seeded by its group id.

    Rewards are a coin flip per sample, or with `alternate_rewards` 0, 1, 0, ... so every group has both (its
    advantages are never all zero)."""
    rng = np.random.default_rng(zlib.crc32(task.group_id.encode()))
    samples, rewards = [], []
    for i in range(task.num_samples):
        n = int(rng.integers(2, 7))
        samples.append(
            Sample(
                response_ids=pack_ids(rng.integers(10, 250, size=n)),
                logprobs=pack_logprobs(-5.5 + rng.uniform(-0.6, 0.6, size=n)),
                text="",
                finish_reason="stop",
                status="completed",
                weight_segments=[WeightSegment(0, task.policy_version)],
            )
        )
        r = float(i % 2) if alternate_rewards else float(rng.random() < 0.5)
        rewards.append(SampleReward(reward=r, outcome_reward=r, rubric_reward=0.0))
    return ScoredGroup(group=Group(task=task, samples=samples), rewards=rewards)


class ScoredDriver(threading.Thread):
    """Tasks -> scored groups (`scored_group`), acked one by one, until `close()`; at most `limit` of them
    (None: no limit). `done` counts the groups published."""

    def __init__(self, redis_url: str, run_id: str, limit: int | None = None, alternate_rewards: bool = False) -> None:
        super().__init__(daemon=True)
        self._broker = connect(BrokerConfig(redis_url=redis_url, run_id=run_id))
        self._tasks = self._broker.consumer(TASKS, Task, group="rollout", name="driver")
        self._scored = self._broker.producer(SCORED, ScoredGroup)
        self._alternate_rewards = alternate_rewards
        self.limit = limit
        self.done = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            room = READ_COUNT if self.limit is None else min(READ_COUNT, self.limit - self.done)
            if room <= 0:
                time.sleep(0.05)
                continue
            for entry in self._tasks.read(room, block_s=0.2):
                self._scored.publish([scored_group(entry.msg, self._alternate_rewards)], dedup_key=lambda s: s.group_id)
                self._tasks.ack([entry.id])
                self.done += 1
        self._broker.close()

    def close(self, timeout_s: float = 10) -> None:
        """Stop and wait for the thread (a no-op wait when it was never started)."""
        self.stop.set()
        if self.ident is not None:
            self.join(timeout_s)
