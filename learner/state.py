"""The learner's resumable state besides the weights: step, policy version, dataset cursor, consumed groups.

It is saved with every checkpoint (as JSON next to megatron's files) and restored on resume, so a
restarted learner admits the same next tasks, skips groups it already trained on, and counts on.
"""

from __future__ import annotations

from pathlib import Path

import msgspec


class DataCursor(msgspec.Struct, kw_only=True):
    """Where the feeder is in the dataset."""

    epoch: int = 0
    position: int = 0  # next index into this epoch's permutation
    admitted: int = 0  # groups admitted (published as tasks) in total, over all epochs
    num_skipped: int = 0  # prompts skipped because they leave no room for a response


class LearnerState(msgspec.Struct, kw_only=True):
    step: int = 0  # optimizer steps done
    # The policy version: the step whose weights last reached the engines (== step with weight_sync type none).
    # The learner's only copy: WeightSync.push writes it after a successful push and publishes it to the broker's
    # key; the feeder admits and the reader drops stale groups against it.
    policy_version: int = 0
    cursor: DataCursor = msgspec.field(default_factory=DataCursor)
    # Every group id whose fate is decided (trained in a saved step, dropped, dead-lettered): a redelivered copy is
    # skipped. Groups read but carried over to a later step are not in it (scored_reader.py, ScoredReader.ack_held).
    consumed_group_ids: list[str] = []
    # Admitted groups not yet read from `scored`: group id -> policy version at admission (written by the feeder,
    # removed by the reader). The reader waits for the ones about to go stale (scored_reader.py, "due" groups).
    admitted_unread: dict[str, int] = {}
    num_trained_groups: int = 0
    num_dropped_stale: int = 0
    num_dropped_zero_variance: int = 0
    num_dead_lettered: int = 0
    num_duplicates: int = 0
    stopped_early: bool = False  # early_stop ended training: a restart must not train on to max_steps

    @property
    def num_released(self) -> int:
        """Admitted groups that will never be trained; each frees its admission slot (see feeder.py)."""
        return self.num_dropped_stale + self.num_dropped_zero_variance + self.num_dead_lettered

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(msgspec.json.encode(self))

    @classmethod
    def load(cls, path: str | Path) -> LearnerState:
        return msgspec.json.decode(Path(path).read_bytes(), type=cls)
