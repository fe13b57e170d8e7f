"""LongTraceRL-format rows: validation errors with line numbers, lossless round trips, statistics."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from datagen.dataset import DatasetError, iter_rows, make_row, validate_file, write_rows
from datagen.stats import dataset_stats


def _row(**over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "source": "longqa",
        "input_messages": [{"role": "user", "content": "Answer.\n\nDocuments:\n<section>Ann met Bo.</section>\n\nQ?"}],
        "label": "Bo",
        "metadata": {"extra_reward_info": {"question": "Who?", "rubrics": ["Ann"], "dataset_name": "longqa"}},
    }
    row.update(over)
    return row


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_validator_reports_each_bad_line_with_its_number(tmp_path: Path) -> None:
    """Guards against a validator that stops at the first error, miscounts lines, or gives no reason."""
    info = {"question": "Who?", "rubrics": ["Ann"], "dataset_name": "longqa"}
    lines: list[Any] = [
        _row(),  # 1 ok
        "{not json",  # 2
        _row(input_messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),  # 3
        _row(metadata={"extra_reward_info": {"rubrics": [], "dataset_name": "x"}}),  # 4
        "",  # 5 blank: skipped
        _row(metadata={"extra_reward_info": info | {"rubrics": ["Ann", "!!"]}}),  # 6
        _row(input_messages=[{"role": "system", "content": "a"}]),  # 7
        _row(label=""),  # 8
        _row(),  # 9 ok
    ]
    report = validate_file(_write(tmp_path / "d.jsonl", lines))
    assert report.num_rows == 2 and report.num_errors == 6 and not report.ok
    by_line = {e.line: e.reason for e in report.errors}
    assert sorted(by_line) == [2, 3, 4, 6, 7, 8]
    assert "invalid JSON" in by_line[2]
    assert "exactly one" in by_line[3]
    assert by_line[4] == "metadata.extra_reward_info.question: missing"
    assert "rubrics[1]" in by_line[6] and "empty" in by_line[6]
    assert "'user'" in by_line[7]
    assert by_line[8] == "label: empty"
    assert str(report.errors[0]).startswith(f"{tmp_path / 'd.jsonl'}:2: ")


def test_iter_rows_raises_dataset_error_naming_file_and_line(tmp_path: Path) -> None:
    """Guards against a loader that yields a row missing dataset_name (the reward server would KeyError later)."""
    path = _write(tmp_path / "d.jsonl", [_row(), _row(metadata={"extra_reward_info": {"question": "q"}})])
    rows = iter_rows(path)
    assert next(rows).label == "Bo"
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: metadata\.extra_reward_info\.dataset_name: missing") as e:
        next(rows)
    assert e.value.line == 2


def test_round_trip_is_lossless_including_unknown_keys(tmp_path: Path) -> None:
    """Guards against dropping keys the format allows (extra reward info, metadata, top level) on rewrite."""
    original = _row(id=7)
    original["metadata"]["extra_reward_info"]["difficulty"] = "hard"
    original["metadata"]["origin"] = {"file": "x"}
    src = _write(tmp_path / "a.jsonl", [original])
    out = tmp_path / "b.jsonl.gz"
    assert write_rows(out, iter_rows(src)) == 1
    with gzip.open(out, "rt") as f:
        assert json.loads(f.readline()) == original
    (row,) = list(iter_rows(out))
    assert row.extra_reward_info["difficulty"] == "hard" and row.extra == {"id": 7}


def test_longrlvr_rows_take_chunk_id_rubrics() -> None:
    """Guards against rejecting the LongRLVR variant, whose rubrics are gold chunk ids, or accepting words there."""
    ok = _row(metadata={"extra_reward_info": {"question": "q", "rubrics": [3, "17"], "dataset_name": "longrlvr"}})
    from datagen.dataset import parse_row

    assert parse_row(ok).rubrics == [3, "17"]
    bad = _row(metadata={"extra_reward_info": {"question": "q", "rubrics": ["Ann"], "dataset_name": "longrlvr"}})
    with pytest.raises(ValueError, match="chunk id"):
        parse_row(bad)


def test_make_row_checks_like_the_loader() -> None:
    """Guards against the builder writing rows the validator would reject (e.g. an empty-normalising rubric)."""
    row = make_row("ctx", "Bo", "Who?", ["Ann"], "longqa")
    assert row.to_dict()["input_messages"] == [{"role": "user", "content": "ctx"}]
    with pytest.raises(ValueError, match="normalises to an empty string"):
        make_row("ctx", "Bo", "Who?", ["..."], "longqa")


def test_writer_leaves_no_partial_file_on_error(tmp_path: Path) -> None:
    """Guards against a crash mid-write leaving a truncated dataset that looks complete."""
    out = tmp_path / "out.jsonl"

    def rows() -> Any:
        yield make_row("ctx", "Bo", "Who?", ["Ann"], "longqa")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_rows(out, rows())
    assert not out.exists() and not list(tmp_path.iterdir())


def test_stats_counts_tokens_rubrics_and_grounding(tmp_path: Path) -> None:
    """Guards against stats that miscount context words or report rubrics absent from the context as grounded."""
    info = {"question": "Who?", "rubrics": ["Ann", "Zed"], "dataset_name": "longqa"}
    path = _write(tmp_path / "d.jsonl", [_row(), _row(metadata={"extra_reward_info": info})])
    stats = dataset_stats(path)
    assert stats["num_rows"] == 2
    # "Answer.", "Documents:", "<section>Ann", "met", "Bo.</section>", "Q?"
    assert stats["context_tokens"]["min"] == 6 and stats["context_tokens"]["total"] == 12
    assert stats["rubric_count_histogram"] == {"1": 1, "2": 1}
    assert stats["rubric_in_context_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert stats["sections_per_row"]["max"] == 1


def test_private_norm_matches_the_reward_services() -> None:
    """Guards against datagen's copy of the rubric normalisation drifting from the reward's: the builder's
    'distractor contains a rubric entity' statistic and answer matching must use the reward's exact test."""
    from common.text import norm as reward_norm
    from datagen.text import answers_match, contains_entity, norm

    cases = ["Lady Gaga", "  Café Été ", "北京 大学", "snake_case-Words!", "E1 vs E17", "K\u212aelvin", "", "..."]
    assert [norm(s) for s in cases] == [reward_norm(s) for s in cases]
    assert contains_entity(norm("E17 met Bo"), "E1")  # substring test, no word boundaries (like the reward)
    assert not contains_entity(norm("anything"), "...")
    assert answers_match(" PARIS. ", "Paris") and not answers_match("", "")
