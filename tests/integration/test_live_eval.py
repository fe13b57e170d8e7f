"""`longtrace up` with held-out evals DURING an RL phase (configs/debug/live_eval.toml: `[eval] every_steps`), every
real process as in test_launcher_up.py: the evals run on the serving engines while the learner trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.launcher.live_eval import ACCURACY_TAG
from deploy.launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "debug" / "live_eval.toml"


def _scalars(tensorboard_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: list[tuple[int, float]] = []
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


@pytest.mark.slow
def test_up_evaluates_during_rl_without_stopping_training(tmp_path: Path) -> None:
    """Guards against in-training evals that do not happen (the schedule never sees the learner's steps), that
    stop or fail the training, that lose the policy versions they ran under, that overlap (two at once) or run at
    the last step, that miss TensorBoard's `eval/accuracy` beside the learner's curves, or that the report does
    not plot (heldout_during.png) nor put in summary.json (`heldout.during_rl`)."""
    run_path = tmp_path / "run"
    argv = [sys.executable, "-m", "deploy.cli", "up", str(CONFIG), "--no-dashboard", "--run_dir", str(run_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=280, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = RunDir.at(run_path)
    metrics = run.metrics("rl")
    assert [m["step"] for m in metrics] == list(range(1, 31))  # training went on to its last step

    evals = run.live_evals("rl")
    assert len(evals) >= 2, result.stdout[-3000:]
    steps = [e["step"] for e in evals]
    assert steps == sorted(set(steps)) and all(6 <= s < 30 for s in steps), steps
    for e in evals:
        assert e["status"] == "ok", e
        assert 0.0 <= e["accuracy"] <= 1.0 and 0.0 <= e["rubric_mean"] <= 1.0
        assert e["num_questions"] == 8 and e["split"] == "heldout" and e["wall_s"] > 0
        # the engines held at least the step's weights when the eval started (one push per step)
        assert e["step"] <= e["policy_version_min"] <= e["policy_version_max"] <= 30, e
    for prev, nxt in zip(evals, evals[1:], strict=False):  # one at a time: each started after the last ended
        assert nxt["time_s"] - nxt["wall_s"] >= prev["time_s"] - 0.5

    tensorboard = _scalars(run.phase_dir("rl") / "tensorboard", ACCURACY_TAG)
    assert [step for step, _ in tensorboard] == steps  # eval/accuracy at the learner step, beside its curves
    assert [value for _, value in tensorboard] == pytest.approx([e["accuracy"] for e in evals])

    summary = json.loads((run.report_dir / "summary.json").read_text())
    assert summary["heldout"]["during_rl"] == [{"step": e["step"], "accuracy": e["accuracy"]} for e in evals]
    assert (run.report_dir / "heldout_during.png").stat().st_size > 0
    assert "## Held-out evaluation during training" in (run.report_dir / "report.md").read_text()
