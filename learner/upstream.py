"""Admitted groups that died upstream: rank 0 releases their admission slots, so that a run whose groups are lost
still finishes (the feeder admits a replacement for each: feeder.py, `admission_limit`), and counts them by cause.

Two sources, both read through the broker's read-only views (nothing is delivered, claimed or acked):
- the run's `dead` stream. A letter that names an admitted, undecided group (`DeadLetter.group_id`) releases it,
  counted under its cause (CAUSES). Letters are read in order after `LearnerState.dead_read_after`, which is saved
  with each checkpoint, like the held `scored` acks: a restarted learner re-reads exactly the letters its saved
  state has not counted. The letters stay in the stream for inspection and replay (its cap and what happens to a
  letter trimmed unread: `BrokerConfig.dead_max_entries`).
- groups that vanished (an entry deleted outside the broker, a Redis restarted without its data, a letter trimmed
  before it was read). Once a step has waited `--batch.lost_scan_after_s`, and at most that often, the admitted
  groups not read yet are looked for in every stream, upstream first: tasks, rollouts, scored, then the dead letters
  not read yet. An entry moves downstream by an append before its delete (publish then ack; the broker's bury), so
  a group on the move is seen in the stream it left or in one scanned after it. A group missing from two
  consecutive scans is released as `lost`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

from broker.base import DEAD, ROLLOUTS, SCORED, TASKS, Broker, StreamView
from broker.entries import OVER_DELIVERED, UNDECODABLE
from broker.schemas import DeadLetter, Group, M, ScoredGroup, Task
from learner.scored_reader import ScoredReader
from learner.train_config import BatchConfig

logger = logging.getLogger(__name__)

# The causes an admitted group is given up for (LearnerState.groups_dead_lettered, `groups_dead_lettered/<cause>`
# in metrics.jsonl).
CAUSES = {
    "rollout": "a rollout worker gave the task up (e.g. the engines rejected it, or its output was too large)",
    "judge": "a reward worker gave the group up (its judge failing past the retries, or a scored group too large)",
    "invalid": "the learner's reader: a malformed scored group",
    "undecodable": "an entry no consumer could decode, that still names its group",
    "max_deliveries": "an entry delivered more than --broker.max_deliveries times (it crashed its consumers)",
    "lost": "missing from every stream in two scans (deleted, lost with Redis's data, or its letter trimmed unread)",
}
_BY_STREAM = {TASKS: "rollout", ROLLOUTS: "judge", SCORED: "invalid"}
PAGE = 100  # entries per read of a stream
DEAD_PAGES_PER_POLL = 10  # a backlog of letters is worked off over several polls, so a poll stays short


def cause_of(letter: DeadLetter) -> str:
    """Why the letter's group is given up on (a key of CAUSES)."""
    if letter.reason.startswith(UNDECODABLE):
        return "undecodable"
    if letter.reason.startswith(OVER_DELIVERED):
        return "max_deliveries"
    return _BY_STREAM.get(letter.stream, letter.stream)


def _pages(view: StreamView, kind: type[M], after: str) -> Iterator[M]:
    """Every decodable message of the stream after `after`, in stream order."""
    while True:
        page = view.peek(kind, after, PAGE)
        yield from (e.msg for e in page.entries)
        if page.last_id == after:
            return
        after = page.last_id


class UpstreamReleases:
    """Releases admitted groups that died upstream (see the module docstring); call `poll` before each read."""

    def __init__(self, broker: Broker, reader: ScoredReader, cfg: BatchConfig) -> None:
        self._reader = reader
        self._state = reader.ledger.state
        self._cfg = cfg
        self._tasks, self._rollouts, self._scored = broker.view(TASKS), broker.view(ROLLOUTS), broker.view(SCORED)
        self._dead = broker.view(DEAD)
        self._missing: set[str] = set()  # admitted groups missing from every stream at the last scan
        self._last_scan = -math.inf
        if reader.ledger.needs_adoption:
            adopted = reader.ledger.adopt_in_flight(self.in_streams())
            logger.info("adopted %d groups in flight from the streams (a checkpoint from before the ledger)", adopted)

    def poll(self) -> int:
        """Release what the new dead letters name, and scan for vanished groups when the step has waited long
        enough; return how many groups were released."""
        released = self._read_dead()
        every = self._cfg.lost_scan_after_s
        if self._reader.waiting_s >= every and time.monotonic() - self._last_scan >= every:
            self._last_scan = time.monotonic()
            released += self._scan()
        return released

    def _read_dead(self) -> int:
        released = 0
        for _ in range(DEAD_PAGES_PER_POLL):
            after = self._state.dead_read_after
            page = self._dead.peek(DeadLetter, after, PAGE)
            for entry in page.entries:
                letter = entry.msg
                cause = cause_of(letter)
                if letter.group_id and self._reader.release(letter.group_id, cause):
                    released += 1
                    logger.warning(
                        "released group %s (%s): %s gave up its %s entry: %s",
                        letter.group_id,
                        cause,
                        letter.consumer or "a consumer",
                        letter.stream,
                        letter.reason,
                    )
            if page.last_id == after:
                break
            self._state.dead_read_after = page.last_id
        return released

    def in_streams(self) -> dict[str, int]:
        """The groups in the streams now, with their admission version (0 for a dead letter), scanned upstream
        first so that a group moving downstream during the scan is seen."""
        found: dict[str, int] = {}
        for task in _pages(self._tasks, Task, "0-0"):
            found.setdefault(task.group_id, task.policy_version)
        for group in _pages(self._rollouts, Group, "0-0"):
            found.setdefault(group.group_id, group.task.policy_version)
        for scored in _pages(self._scored, ScoredGroup, "0-0"):
            found.setdefault(scored.group_id, scored.group.task.policy_version)
        for letter in _pages(self._dead, DeadLetter, self._state.dead_read_after):
            if letter.group_id:
                found.setdefault(letter.group_id, 0)
        return found

    def _scan(self) -> int:
        candidates = self._reader.unread()
        if not candidates:
            self._missing = set()
            return 0
        missing = candidates - self.in_streams().keys()
        lost = missing & self._missing
        released = 0
        for group_id in sorted(lost):
            if self._reader.release(group_id, "lost"):
                released += 1
                logger.warning(
                    "released group %s (lost): admitted, not read, and in no stream in two scans %.0fs apart",
                    group_id,
                    self._cfg.lost_scan_after_s,
                )
        self._missing = missing - lost
        if self._missing:
            logger.info(
                "%d admitted group(s) in no stream (released as lost if still missing at the next scan): %s",
                len(self._missing),
                ", ".join(sorted(self._missing)[:5]),
            )
        return released
