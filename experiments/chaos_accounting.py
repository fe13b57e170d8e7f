"""The chaos bench's accounting: the fate of every admitted group, each fate counted from a source that the code under
test does not use to decide it, so that a loss or a duplicate shows.

    admitted        the `tasks` dedup keys in Redis (every task the feeder ever published, by any learner lineage)
    trained         the `trained_group_ids` of the final lineage's lines in metrics.jsonl (flushed per step, so it
                    survives kills; a step retrained after a learner kill replaces the lost lineage's line)
    dropped_stale   the final lineage's `released_group_ids["stale"]` in metrics.jsonl (and "zero_variance")
    dead_lettered   the group ids named by letters in the `dead` stream (written by the worker that gave up)
    pending_end     the group ids of the entries still in `tasks`, `rollouts` and `scored` at the end

A group the learner released as `lost` (missing from every stream) counts as lost. `groups_duplicated` counts every
fate beyond the first of one group (trained twice, trained and dropped, trained and dead-lettered, ...), with
multiplicity; `groups_lost` the admitted groups with no fate at all, plus those released as lost. Conservation:
admitted = trained + dropped_stale + dropped_zero_variance + dead_lettered + pending_end, where each term is its
source's own count (with multiplicity), and no fate names a group that was not admitted. It fails, with the reason,
when a source is unreadable or empty (no admitted group, no metrics line, a missing step, a line without the
records), so a scan that silently returns nothing cannot pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from learner.metrics import RELEASED_GROUP_IDS, TRAINED_GROUP_IDS, lineage_lines

DROP_CAUSES = ("stale", "zero_variance")


@dataclass
class Sources:
    """What the accounting reads (None: the source could not be read)."""

    admitted: set[str] | None
    metrics_lines: list[dict[str, Any]] | None
    dead_group_ids: set[str] | None
    pending_group_ids: set[str] | None
    steps: int  # the phase's steps: the lineage must hold each of 1..steps once


@dataclass
class Accounting:
    groups_admitted: int = 0
    groups_trained: int = 0
    groups_dropped_stale: int = 0
    groups_dropped_zero_variance: int = 0
    groups_dead_lettered: int = 0
    groups_pending_end: int = 0
    groups_lost: int = 0
    groups_duplicated: int = 0
    groups_released_by_cause: dict[str, int] = field(default_factory=dict)  # the learner's metrics record
    conservation_ok: bool = False
    problems: list[str] = field(default_factory=list)  # why conservation failed, or the sources that are unusable
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few lost / duplicated / unknown ids

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "duplicates_counted_from": "metrics"}


def account(src: Sources) -> Accounting:
    out = Accounting()
    problems = out.problems
    if src.admitted is None:
        problems.append("the tasks stream's dedup keys could not be read")
    elif not src.admitted:
        problems.append("no admitted group: the tasks stream's dedup keys are empty")
    if src.dead_group_ids is None:
        problems.append("the dead stream could not be read")
    if src.pending_group_ids is None:
        problems.append("the streams' entries could not be read")
    lineage = lineage_lines(src.metrics_lines or [])
    if src.metrics_lines is None:
        problems.append("metrics.jsonl could not be read")
    elif sorted(lineage) != list(range(1, src.steps + 1)):
        missing = sorted(set(range(1, src.steps + 1)) - set(lineage))
        problems.append(f"metrics.jsonl's lineage lacks steps {missing[:10]} of 1..{src.steps}")
    bare = [s for s, m in lineage.items() if TRAINED_GROUP_IDS not in m or RELEASED_GROUP_IDS not in m]
    if bare:
        problems.append(f"metrics.jsonl steps {bare[:10]} lack {TRAINED_GROUP_IDS} or {RELEASED_GROUP_IDS}")

    admitted = src.admitted or set()
    fates: Counter[str] = Counter()  # group id -> how many fates it was given
    trained = [g for m in lineage.values() for g in m.get(TRAINED_GROUP_IDS, [])]
    released: dict[str, list[str]] = {}
    for m in lineage.values():
        for cause, ids in m.get(RELEASED_GROUP_IDS, {}).items():
            released.setdefault(cause, []).extend(ids)
    out.groups_released_by_cause = {cause: len(ids) for cause, ids in sorted(released.items())}
    dead = (src.dead_group_ids or set()) & admitted
    lost_released = set(released.get("lost", []))
    fates.update(trained)
    for cause in DROP_CAUSES:
        fates.update(released.get(cause, []))
    # A dead-lettered group has one fate whether or not the learner released it before the end (its letter is the
    # source); the learner's release of a letter's group is the same fate, not a second one.
    fates.update(dead)
    pending = (src.pending_group_ids or set()) & admitted
    pending_only = pending - set(fates)  # a copy of a decided group left in a stream is not a fate
    fates.update(pending_only)

    out.groups_admitted = len(admitted)
    out.groups_trained = len(trained)
    out.groups_dropped_stale = len(released.get("stale", []))
    out.groups_dropped_zero_variance = len(released.get("zero_variance", []))
    out.groups_dead_lettered = len(dead)
    out.groups_pending_end = len(pending_only)
    unaccounted = admitted - set(fates) - lost_released
    out.groups_lost = len(unaccounted) + len(lost_released)
    duplicated = {g: n - 1 for g, n in fates.items() if n > 1}
    out.groups_duplicated = sum(duplicated.values())
    unknown = set(fates) - admitted
    out.examples = {
        "lost": sorted(unaccounted | lost_released)[:5],
        "duplicated": sorted(duplicated)[:5],
        "not_admitted": sorted(unknown)[:5],
    }
    total = (
        out.groups_trained
        + out.groups_dropped_stale
        + out.groups_dropped_zero_variance
        + out.groups_dead_lettered
        + out.groups_pending_end
    )
    if unknown:
        problems.append(f"{len(unknown)} groups have a fate but were never admitted (the admitted record is short)")
    if total != out.groups_admitted:
        problems.append(
            f"admitted {out.groups_admitted} != trained {out.groups_trained} + dropped stale "
            f"{out.groups_dropped_stale} + zero variance {out.groups_dropped_zero_variance} + dead-lettered "
            f"{out.groups_dead_lettered} + pending {out.groups_pending_end} = {total}"
        )
    out.conservation_ok = not problems
    return out
