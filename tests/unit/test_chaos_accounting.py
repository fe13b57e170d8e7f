"""The chaos bench's accounting (experiments/chaos_accounting.py) sees the failures it counts: a group trained twice,
a group lost, a source that could not be read or came back empty. Built from synthetic sources, so each failure is
present by construction and the accounting must report it."""

from __future__ import annotations

from typing import Any

from experiments.chaos_accounting import Sources, account


def _line(step: int, trained: list[str], released: dict[str, list[str]] | None = None) -> dict[str, Any]:
    return {"step": step, "loss": 0.1, "trained_group_ids": trained, "released_group_ids": released or {}}


def _clean() -> Sources:
    lines = [_line(1, ["a", "b"]), _line(2, ["c", "d"], {"stale": ["e"]}), _line(3, ["f", "g"], {"judge": ["h"]})]
    return Sources(
        admitted=set("abcdefghi"), metrics_lines=lines, dead_group_ids={"h"}, pending_group_ids={"i"}, steps=3
    )


def test_a_clean_run_is_conserved() -> None:
    """Guards against an accounting that fails a correct run (every group has exactly one fate)."""
    acc = account(_clean())
    assert acc.conservation_ok, acc.problems
    assert (acc.groups_trained, acc.groups_dropped_stale, acc.groups_dead_lettered, acc.groups_pending_end) == (
        6, 1, 1, 1)  # fmt: skip
    assert (acc.groups_lost, acc.groups_duplicated) == (0, 0)
    assert acc.to_json()["duplicates_counted_from"] == "metrics"


def test_a_group_trained_in_two_steps_is_a_duplicate() -> None:
    """Guards against the old bench's blind spot: duplicates counted from the learner's own dedup record could not be
    anything but 0. Here the metrics record trains `c` twice (and a retrained step that replaced its lost lineage
    must not count as a duplicate)."""
    src = _clean()
    assert src.metrics_lines is not None
    src.metrics_lines[2] = _line(3, ["f", "c"], {"judge": ["h"]})  # g lost, c twice
    src.metrics_lines.insert(2, _line(2, ["c", "d"], {"stale": ["e"]}))  # step 2 retrained after a kill: not a dup
    acc = account(src)
    assert acc.groups_duplicated == 1 and acc.examples["duplicated"] == ["c"]
    assert acc.groups_lost == 1 and acc.examples["lost"] == ["g"]
    # The counts balance (a duplicate hides a loss in the sum): the bench fails a run on lost and duplicated too.
    assert acc.conservation_ok


def test_a_group_with_no_fate_or_released_as_lost_is_lost_and_breaks_conservation() -> None:
    """Guards against a loss that reads 0: an admitted group nowhere in the records, and one the learner itself
    gave up on as `lost` (missing from every stream), both count as lost."""
    src = _clean()
    assert src.metrics_lines is not None
    src.pending_group_ids = set()  # i vanished
    src.metrics_lines[2] = _line(3, ["f", "g"], {"judge": ["h"], "lost": ["j"]})
    src.admitted = set("abcdefghij")
    acc = account(src)
    assert acc.groups_lost == 2 and sorted(acc.examples["lost"]) == ["i", "j"]
    assert not acc.conservation_ok and "admitted 10" in acc.problems[0]


def test_an_unreadable_or_empty_source_fails_conservation() -> None:
    """Guards against a scan that fails or returns nothing passing as 'nothing lost': empty admitted keys, an
    unreadable dead stream, a metrics file missing steps or lacking the records each fail with a reason."""
    src = _clean()
    src.admitted = set()
    acc = account(src)
    assert not acc.conservation_ok and any("no admitted group" in p for p in acc.problems)

    src = _clean()
    src.dead_group_ids = None
    assert any("dead stream could not be read" in p for p in account(src).problems)

    src = _clean()
    src.metrics_lines = [_line(1, ["a", "b"])]
    assert any("lacks steps [2, 3]" in p for p in account(src).problems)

    src = _clean()
    assert src.metrics_lines is not None
    del src.metrics_lines[0]["trained_group_ids"]
    assert any("lack trained_group_ids" in p for p in account(src).problems)


def test_a_fate_for_a_group_never_admitted_means_the_admitted_record_is_short() -> None:
    """Guards against a partial admitted record (e.g. dedup keys expired or lost with Redis) hiding losses: a trained
    group that was never admitted fails conservation."""
    src = _clean()
    src.admitted = set("bcdefghi")
    acc = account(src)
    assert not acc.conservation_ok and acc.examples["not_admitted"] == ["a"]
