"""`longtrace data` end to end in subprocesses: synth -> validate -> stats, and build reproducing synth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _longtrace(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_synth_validate_stats_and_rebuild_round_trip(tmp_path: Path) -> None:
    """Guards against the CLI wiring (flags not reaching the config), synth output the validator rejects,
    stats disagreeing with the files, and synth files that `data build` cannot turn back into the same rows."""
    out = tmp_path / "full"
    synth = _longtrace(
        "data", "synth", "--out", str(out), "--num-questions", "12", "--num-entities", "60",
        "--context-tokens", "600", "--seed", "7", "--quiet", "--json",
    )  # fmt: skip
    summary = json.loads(synth.stdout)
    assert summary["build"]["num_rows"] == 12 and summary["build"]["budget"] == 600
    dataset = Path(summary["paths"]["dataset"])

    valid = _longtrace("data", "validate", str(dataset), "--json")
    assert json.loads(valid.stdout) == {
        "path": str(dataset), "ok": True, "num_rows": 12, "num_errors": 0, "errors": [],
    }  # fmt: skip
    stats = json.loads(_longtrace("data", "stats", str(dataset), "--json").stdout)
    assert stats["num_rows"] == 12 and stats["context_tokens"]["max"] <= 600
    assert stats["rubrics_per_row"]["min"] == 3 and stats["rubric_in_context_rate"] == 1.0

    rebuilt = tmp_path / "rebuilt.jsonl"
    build = _longtrace(
        "data", "build", "--questions", str(out / "questions.jsonl"), "--trajectories",
        str(out / "trajectories.jsonl"), "--docs", str(out / "docs.jsonl"), "--out", str(rebuilt),
        "--context-tokens", "600", "--seed", "7", "--json",
    )  # fmt: skip
    assert json.loads(build.stdout)["num_rows"] == 12
    assert "build: 12/12" in build.stderr  # progress goes to stderr
    assert rebuilt.read_bytes() == dataset.read_bytes()


def test_tiny_synth_writes_sft_and_vocab(tmp_path: Path) -> None:
    """Guards against the tiny style missing its SFT demonstrations or a vocabulary that misses prompt words."""
    out = tmp_path / "tiny"
    _longtrace("data", "synth", "--out", str(out), "--style", "tiny", "--num-questions", "20", "--quiet")
    assert _longtrace("data", "validate", str(out / "dataset.jsonl")).stdout.startswith("OK: 20 valid rows")
    vocab = set((out / "vocab.txt").read_text().split())
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 20
    assert all(set(ex["prompt"].split()) | set(ex["response"].split()) <= vocab for ex in sft)


def test_cli_errors_name_the_line_or_the_flag(tmp_path: Path) -> None:
    """Guards against invalid data or flags exiting 0, or failing with a traceback instead of a reason."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "longqa"}\n')
    proc = _longtrace("data", "validate", str(bad), check=False)
    assert proc.returncode == 1 and f"{bad}:1: input_messages: missing" in proc.stderr
    proc = _longtrace("data", "stats", str(bad), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and ":1: input_messages" in proc.stderr
    proc = _longtrace("data", "synth", "--out", str(tmp_path / "x"), "--hops", "0", check=False)
    assert proc.returncode == 2 and "--hops" in proc.stderr and "Traceback" not in proc.stderr


def test_synth_and_build_read_config_file_flags_win(tmp_path: Path) -> None:
    """Guards against `data synth|build --config FILE` being refused or ignored, a flag not winning over the
    file's key, and a bad key in the file passing silently instead of exiting 2 with its name."""
    synth_toml = tmp_path / "synth.toml"
    synth_toml.write_text('style = "tiny"\nnum_questions = 12\nseed = 3\n')
    out = tmp_path / "tiny"
    synth = _longtrace(
        "data", "synth", "--config", str(synth_toml), "--out", str(out), "--num-questions", "6", "--quiet", "--json"
    )
    summary = json.loads(synth.stdout)
    assert summary["build"]["num_rows"] == 6 and (out / "sft.jsonl").is_file()  # the flag wins; the file's style

    build_toml = tmp_path / "build.toml"
    build_toml.write_text('question_prefix = "\\n\\nQ: "\ncontext_tokens = 60\n')
    rebuilt = tmp_path / "rebuilt.jsonl"
    _longtrace(
        "data", "build", "--config", str(build_toml), "--questions", str(out / "questions.jsonl"), "--trajectories",
        str(out / "trajectories.jsonl"), "--docs", str(out / "docs.jsonl"), "--out", str(rebuilt), "--json",
    )  # fmt: skip
    rows = [json.loads(line) for line in rebuilt.read_text().splitlines()]
    assert rows and all("\n\nQ: " in row["input_messages"][-1]["content"] for row in rows)  # a key with no flag

    synth_toml.write_text("num_questoins = 3\n")
    proc = _longtrace("data", "synth", "--config", str(synth_toml), "--out", str(out), check=False)
    assert proc.returncode == 2 and "num_questoins" in proc.stderr and "Traceback" not in proc.stderr
