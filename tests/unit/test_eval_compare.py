"""`longtrace eval compare` (eval/compare.py, table.py) and the `eval` CLI's argument handling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.aggregate import summarize
from eval.cli import main
from eval.compare import compare, load
from eval.table import format_compare, format_summary


def _run(path: Path, outcomes: dict[str, list[float]], **config: Any) -> Path:
    samples = [
        {
            "id": qid, "question": f"question {qid}?", "dataset_name": "longqa", "sample_index": j, "outcome": o,
            "rubric": 0.0, "well_formed": True, "finished": True, "status": "completed", "response_tokens": 5,
            "response": "long text", "answer": "a", "reward": o,
        }
        for qid, os in outcomes.items()
        for j, o in enumerate(os)
    ]  # fmt: skip
    path.mkdir()
    (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = summarize(samples) | {"config": {"k": 2, "temperature": 0.6, **config}, "model_path": "m"}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_compare_deltas_and_flips(tmp_path: Path) -> None:
    """Guards against wrong deltas, flips counted in the wrong direction, a 1-of-2 question not counted right
    (at least half its samples), questions present in one run only being compared, and a hidden setting change."""
    a = _run(tmp_path / "a", {"q1": [1, 1], "q2": [1, 0], "q3": [0, 0], "q4": [1, 1]})
    b = _run(tmp_path / "b", {"q1": [0, 0], "q2": [0, 1], "q3": [1, 0], "q5": [0, 0]}, temperature=1.0)
    result = compare(load(a), load(b / "summary.json"))
    rows = {r["metric"]: r for r in result["metrics"]}
    assert rows["avg_at_k"]["a"] == pytest.approx(0.625) and rows["avg_at_k"]["b"] == pytest.approx(0.25)
    assert rows["avg_at_k"]["delta"] == pytest.approx(-0.375)
    flips = result["flips"]
    assert [f["id"] for f in flips["right_in_a_wrong_in_b"]] == ["q1"]
    assert [f["id"] for f in flips["wrong_in_a_right_in_b"]] == ["q3"]
    assert (flips["num_common"], flips["only_in_a"], flips["only_in_b"]) == (3, 1, 1)
    assert result["settings_differ"] == {"temperature": [0.6, 1.0]}

    text = format_compare(result)
    assert "avg@k" in text and "-0.375" in text and "temperature 0.6 -> 1.0" in text
    assert "1 right in A and wrong in B, 1 wrong in A and right in B" in text and "question q3?" in text


def test_compare_cli_and_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Guards against `eval compare` not reachable through the eval command, its --json not being JSON, and a
    wrong path giving a traceback instead of a message naming it."""
    a = _run(tmp_path / "a", {"q1": [1, 0]})
    b = _run(tmp_path / "b", {"q1": [0, 0]})
    with pytest.raises(SystemExit) as done:
        main(["compare", str(a), str(b), "--json"])
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out)["flips"]["right_in_a_wrong_in_b"][0]["id"] == "q1"
    with pytest.raises(SystemExit) as done:
        main(["compare", str(a), str(tmp_path / "nope")])
    assert done.value.code == 2
    assert "nope: no summary.json" in capsys.readouterr().err


def test_eval_overrides_reach_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Guards against `--key value` overrides being swallowed by the `compare` positional (argparse reads the
    value after an unknown flag as a positional) or reported without the flag's name."""
    with pytest.raises(SystemExit) as done:
        main(["--model", str(tmp_path), "--dataset_path", "d.jsonl", "--k", "0"])
    assert done.value.code == 2
    assert "--k: Input should be greater than or equal to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--dataset_path", "d.jsonl", "--reward_url", "http://x"])
    assert done.value.code == 2
    assert "--engine_urls is empty" in capsys.readouterr().err


def test_summary_table_names_k() -> None:
    """Guards against a table that hides which k the avg/pass numbers are for."""
    samples = [{"id": "q", "sample_index": j, "outcome": 1.0, "rubric": 0.0, "well_formed": True, "finished": True,
                "status": "completed", "response_tokens": 3} for j in range(4)]  # fmt: skip
    text = format_summary(summarize(samples) | {"timings": {"eval_s": 1.0}})
    assert "avg@4" in text and "pass@4" in text and "1.000" in text
