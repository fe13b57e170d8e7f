"""The learner's resumable state besides the weights: step, policy version, dataset cursor, the fate of admitted groups.

It is saved with every checkpoint (as JSON next to megatron's files, fsynced before the acks that depend on it) and
restored on resume, so a restarted learner admits the same next tasks, skips groups it already trained on, and
counts on. Its size is bounded by the admission window, not by the run's length: which groups are decided is
derived from the feeder's cursor and the groups still out (learner/ledger.py).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from learner.durable import write_durably


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
    # Admitted groups whose fate is not decided yet (not trained, dropped or released): group id -> policy version
    # at admission. Written by the feeder; a group leaves it when the reader trains or drops it, or when it is
    # released (dead-lettered upstream, or lost: learner/upstream.py). A group read but carried to a later step
    # stays in it. An admitted group not in it is decided (learner/ledger.py), so a redelivered copy is skipped.
    admitted_unread: dict[str, int] = {}
    # Groups decided before the feeder of this lineage admitted them (a resumed learner reads what the lineage it
    # replaces admitted after its checkpoint): group id -> "" (trained or dropped) or the dead-letter cause (its
    # slot is released when the feeder admits it). Bounded by one admission window.
    decided_ahead: dict[str, str] = {}
    # Ids that are not the feeder's (no dataset: SFT demonstrations, tests) decided since the last checkpoint and in
    # the interval before it: a redelivered copy of these is skipped (the entries are acked after the checkpoint).
    recent_decided: list[str] = []
    recent_decided_before: list[str] = []
    dead_read_after: str = "0-0"  # the last entry of the `dead` stream whose letter was taken into account
    num_trained_groups: int = 0
    num_dropped_stale: int = 0
    num_dropped_zero_variance: int = 0
    # Admitted groups given up on, by cause (learner/upstream.py, CAUSES): each released its admission slot.
    groups_dead_lettered: dict[str, int] = {}
    num_duplicates: int = 0
    stopped_early: bool = False  # early_stop ended training: a restart must not train on to max_steps
    # Checkpoints written before the bounded record: every decided group id (migrated by learner/ledger.py, then
    # emptied) and the learner's own dead letters (moved to groups_dead_lettered["invalid"] on load).
    consumed_group_ids: list[str] = []
    legacy_num_dead_lettered: int = msgspec.field(default=0, name="num_dead_lettered")

    def __post_init__(self) -> None:
        if self.legacy_num_dead_lettered:
            self.count_dead("invalid", self.legacy_num_dead_lettered)
            self.legacy_num_dead_lettered = 0

    @property
    def num_dead_lettered(self) -> int:
        """Admitted groups given up on, every cause together."""
        return sum(self.groups_dead_lettered.values())

    @property
    def num_released(self) -> int:
        """Admitted groups that will never be trained; each frees its admission slot (see feeder.py)."""
        return self.num_dropped_stale + self.num_dropped_zero_variance + self.num_dead_lettered

    def count_dead(self, cause: str, n: int = 1) -> None:
        self.groups_dead_lettered[cause] = self.groups_dead_lettered.get(cause, 0) + n

    def save(self, path: str | Path) -> None:
        """Write the state durably (fsynced, file and directory): the acks that follow a checkpoint depend on it."""
        write_durably(path, msgspec.json.encode(self))

    @classmethod
    def load(cls, path: str | Path) -> LearnerState:
        return msgspec.json.decode(Path(path).read_bytes(), type=cls)
