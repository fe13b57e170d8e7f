"""Which groups' fates are decided, in a record bounded by the admission window (rank 0: shared by feeder and reader).

A group is decided once the reader trained or dropped it, or once it was released (dead-lettered upstream or
lost: learner/upstream.py); a copy that arrives later (redelivered after a crash between a checkpoint and its
acks, or published twice) is refused as a duplicate. A list of every decided id would grow with the run. The
feeder's deterministic order makes it unnecessary: its group ids are `run/e<epoch>/i<index>`, so a group is
decided iff the feeder admitted it (its place in the order is before the cursor) and it is no longer in
`LearnerState.admitted_unread`. Two exceptions, both bounded:
- groups decided before this lineage's feeder admitted them (`decided_ahead`): a resumed learner may read groups
  that the lineage it replaces admitted after the checkpoint, before its own feeder republishes them;
- ids that are not the feeder's (no dataset: SFT demonstrations, tests): those decided in the current and the
  previous checkpoint interval (`recent_decided*`), which covers redelivery after a crash between a checkpoint and
  its acks (and an ack Redis lost with its last second of writes).
"""

from __future__ import annotations

import logging
from typing import Protocol

from learner.state import LearnerState

logger = logging.getLogger(__name__)


class FeederOrder(Protocol):
    """Where a group id sits in the feeder's order (learner/feeder.py, AdmissionOrder)."""

    def parse(self, group_id: str) -> tuple[int, int] | None:
        """(epoch, dataset index) of one of the feeder's group ids; None for any other id."""
        ...

    def position(self, epoch: int, index: int) -> int:
        """The place of dataset row `index` in epoch `epoch`'s order."""
        ...


class GroupLedger:
    def __init__(self, state: LearnerState, order: FeederOrder | None = None) -> None:
        self._state = state
        self._order = order
        self._recent = set(state.recent_decided) | set(state.recent_decided_before)
        # The ids of a checkpoint written before the bounded record, until the groups it had in flight are adopted.
        self._legacy: set[str] | None = None
        # Groups given up on since the last batch, by cause ("stale", "zero_variance" or a CAUSES key of
        # upstream.py): the next step's metrics line records them (`released_group_ids`), beside the trained ones.
        self._released: dict[str, list[str]] = {}
        if state.consumed_group_ids:
            self._migrate(state.consumed_group_ids)

    @property
    def state(self) -> LearnerState:
        return self._state

    def _admitted(self, group_id: str) -> bool | None:
        """Whether the feeder admitted the group (it is before the cursor); None for an id that is not the feeder's."""
        parsed = self._order.parse(group_id) if self._order is not None else None
        if parsed is None:
            return None
        epoch, index = parsed
        c = self._state.cursor
        if epoch != c.epoch:
            return epoch < c.epoch
        assert self._order is not None
        return self._order.position(epoch, index) < c.position

    def is_decided(self, group_id: str) -> bool:
        """The group was trained, dropped or released: a copy of it must not be trained."""
        st = self._state
        admitted = self._admitted(group_id)
        if admitted is None:
            return group_id in self._recent
        if admitted:
            return group_id not in st.admitted_unread
        return group_id in st.decided_ahead

    def admit(self, group_id: str, version: int) -> None:
        """The feeder published the group's task at policy version `version`."""
        st = self._state
        cause = st.decided_ahead.pop(group_id, None)
        if cause is None:
            st.admitted_unread[group_id] = version
        elif cause:  # dead-lettered before this lineage admitted it: its slot is given back now
            st.count_dead(cause)
            self._note(group_id, cause)
            logger.warning("released group %s at its admission: dead-lettered earlier (%s)", group_id, cause)

    def decide(self, group_id: str, released_as: str = "") -> None:
        """The reader trained, dropped or dead-lettered the group (call once, for a group not decided yet);
        `released_as`: why it will not be trained (a drop or a dead-letter cause), empty for a trained group."""
        st = self._state
        if released_as:
            self._note(group_id, released_as)
        st.admitted_unread.pop(group_id, None)
        admitted = self._admitted(group_id)
        if admitted is None:
            st.recent_decided.append(group_id)
            self._recent.add(group_id)
        elif not admitted:
            st.decided_ahead[group_id] = ""

    def release(self, group_id: str, cause: str) -> bool:
        """An admitted group that will never arrive (dead-lettered upstream, or lost): count it under `cause` and
        give its admission slot back. False when it is decided already or was not admitted by this feeder."""
        st = self._state
        if group_id in st.admitted_unread:
            st.count_dead(cause)
            self.decide(group_id, cause)
            return True
        if self._admitted(group_id) is False and group_id not in st.decided_ahead:
            st.decided_ahead[group_id] = cause  # counted when this lineage's feeder admits it
            return True
        return False

    def _note(self, group_id: str, cause: str) -> None:
        self._released.setdefault(cause, []).append(group_id)

    def take_released(self) -> dict[str, list[str]]:
        """The groups given up on since the last call, by cause (for the step's metrics line)."""
        released, self._released = self._released, {}
        return released

    def checkpointed(self) -> None:
        """A checkpoint is durable and its acks are done: the window of other ids moves on by one interval."""
        st = self._state
        st.recent_decided_before, st.recent_decided = st.recent_decided, []
        self._recent = set(st.recent_decided_before)

    # ------------------------------------------------------------ checkpoints before the bounded record

    def _migrate(self, consumed: list[str]) -> None:
        """Convert a checkpoint's list of every decided id. Admitted ids need no record (the cursor rule); the
        groups it had in flight but not in `admitted_unread` (read and carried, or given up waiting for) are
        adopted from the streams by `adopt_in_flight`."""
        st = self._state
        for group_id in consumed:
            st.admitted_unread.pop(group_id, None)  # an old resumed feeder recorded republished decided ones again
            admitted = self._admitted(group_id)
            if admitted is None:
                st.recent_decided_before.append(group_id)
                self._recent.add(group_id)
            elif not admitted:
                st.decided_ahead[group_id] = ""
        self._legacy = set(consumed) if self._order is not None else None
        st.consumed_group_ids = []
        logger.info("converted a checkpoint's %d consumed group ids to the bounded record", len(consumed))

    @property
    def needs_adoption(self) -> bool:
        """A converted checkpoint whose groups in flight must be adopted from the streams before the first read."""
        return self._legacy is not None

    def adopt_in_flight(self, in_streams: dict[str, int]) -> int:
        """Record the groups found in the streams (group id -> admission version) that the converted checkpoint had
        admitted but not decided; return how many."""
        legacy, st = self._legacy or set(), self._state
        adopted = 0
        for group_id, version in in_streams.items():
            if self._admitted(group_id) and group_id not in legacy and group_id not in st.admitted_unread:
                st.admitted_unread[group_id] = version
                adopted += 1
        self._legacy = None
        return adopted
