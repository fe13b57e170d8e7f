"""The learner's rank-0 data path on a real broker, without the model, stepped in one thread (deterministic).

The learner's own feeder admits tasks; a stand-in rollout stage turns each task into a group on `rollouts`
(tests/helpers/scored_driver.py's deterministic samples) and a stand-in reward stage scores it onto `scored`, or
gives it up through the broker's real `dead_letter` (as the reward worker does when its judge fails past the
retries) for the groups `judge_down` names. The learner's `UpstreamReleases` and `ScoredReader` assemble the
steps; `run` plays train_loop's part for the state: count the step, move the policy version (a push), and
checkpoint every `checkpoint_every` steps (state saved, then the held entries acked).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.base import ROLLOUTS, SCORED, TASKS, Broker
from broker.schemas import Group, ScoredGroup, Task
from datagen.prompts import JsonlDataset
from learner.batching import TrainBatch
from learner.feeder import Feeder
from learner.scored_reader import CONSUMER_GROUP, ScoredReader
from learner.state import LearnerState
from learner.train_config import BatchConfig, DataConfig, LossConfig
from learner.upstream import UpstreamReleases
from tests.helpers.scored_driver import scored_group

JUDGE_DOWN = "judge failed after 3 attempts: HTTP 503 from the judge"


class LearnerPipeline:
    def __init__(
        self,
        broker: Broker,
        dataset: JsonlDataset,
        tokenizer: Any,
        data: DataConfig,
        batch: BatchConfig,
        max_steps: int,
        state: LearnerState | None = None,
        judge_down: Callable[[str], bool] = lambda group_id: False,
        checkpoint_every: int = 2,
        checkpoint_path: Path | None = None,
    ) -> None:
        self.broker = broker
        self.state = state if state is not None else LearnerState()
        self.max_steps = max_steps
        self.judge_down = judge_down
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = checkpoint_path
        self.feeder = Feeder(
            dataset,
            tokenizer,
            broker.producer(TASKS, Task),
            self.state,
            data,
            broker.run_id,
            max_groups=max_steps * data.groups_per_step,
        )
        consumer = broker.consumer(SCORED, ScoredGroup, group=CONSUMER_GROUP, name="learner")
        self.reader = ScoredReader(consumer, self.state, data, batch, LossConfig(), ledger=self.feeder.ledger)
        self.upstream = UpstreamReleases(broker, self.reader, batch)
        self._tasks = broker.consumer(TASKS, Task, group="rollout", name="rollout-0")
        self._rollouts = broker.producer(ROLLOUTS, Group)
        self._groups = broker.consumer(ROLLOUTS, Group, group="reward", name="reward-0")
        self._scored = broker.producer(SCORED, ScoredGroup)
        self.judged_down: list[str] = []
        self.trained: list[list[str]] = []
        self.released: list[dict[str, list[str]]] = []  # per step, as its metrics line records them

    def stages(self) -> None:
        """One pass of the stand-in rollout and reward workers (publish, then ack; or dead-letter)."""
        for task in self._tasks.read(64, block_s=0):
            self._rollouts.publish([scored_group(task.msg, alternate_rewards=True).group], lambda g: g.group_id)
            self._tasks.ack([task.id])
        for group in self._groups.read(64, block_s=0):
            if self.judge_down(group.msg.group_id):
                self._groups.dead_letter(group, JUDGE_DOWN)
                self.judged_down.append(group.msg.group_id)
                continue
            self._scored.publish([scored_group(group.msg.task, alternate_rewards=True)], lambda s: s.group_id)
            self._groups.ack([group.id])

    def poll(self, block_s: float = 0.02) -> TrainBatch | None:
        """What the trainer's rank-0 poll does (releases, admission, read), after one pass of the stages."""
        self.upstream.poll()
        self.feeder.fill()
        self.stages()
        return self.reader.poll(block_s)

    def train(self, batch: TrainBatch) -> None:
        st = self.state
        st.step += 1
        st.num_trained_groups += len(batch.group_ids)
        st.policy_version = st.step
        self.trained.append(list(batch.group_ids))
        self.released.append(batch.released_group_ids)
        if st.step % self.checkpoint_every == 0 or st.step == self.max_steps:
            self.checkpoint()

    def checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            self.state.save(self.checkpoint_path)
        self.reader.ack_held()

    def run(self, timeout_s: float) -> bool:
        """Train up to max_steps; False when a step did not complete within `timeout_s` of the start."""
        deadline = time.monotonic() + timeout_s
        while self.state.step < self.max_steps:
            if time.monotonic() > deadline:
                return False
            batch = self.poll()
            if batch is not None:
                self.train(batch)
        return True
