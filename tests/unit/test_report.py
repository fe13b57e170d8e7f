"""`longtrace report` and the dashboard's rendering, on a run directory written the way `longtrace up` writes it."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from deploy.cli import main as cli_main
from deploy.launcher.dashboard import Dashboard, PhaseView, rates
from deploy.launcher.rundir import RunDir, mean_staleness
from deploy.report import phase_summaries, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _steps(n: int, t0: float, reward0: float, slope: float, lag: int) -> list[dict[str, Any]]:
    return [
        {
            "step": s,
            "time_s": t0 + 6.0 * s,
            "loss": 1.0 / s,
            "reward_mean": reward0 + slope * s,
            "accuracy": reward0 + slope * s,
            "raw_rubric_mean": 0.5,
            "tokens_per_s": 1000.0,
            "num_samples": 16.0,
            f"staleness/{lag}": 2.0,
            "policy_version": float(s),
            "groups_trained": 2.0 * s,
            "groups_dropped_stale": 1.0,
        }
        for s in range(1, n + 1)
    ]


@pytest.fixture
def run_dir(tmp_path: Path) -> RunDir:
    run = RunDir.at(tmp_path / "run")
    _jsonl(
        run.phases_file,
        [
            {"time_s": 100.0, "phase": "sft", "kind": "sft", "event": "start", "steps": 4, "index": 0},
            {"time_s": 130.0, "phase": "sft", "kind": "sft", "event": "end", "status": "ok", "index": 0},
            {"time_s": 131.0, "phase": "rl", "kind": "rl", "event": "start", "steps": 20, "index": 1},
            {"time_s": 261.0, "phase": "rl", "kind": "rl", "event": "end", "status": "ok", "index": 1},
        ],
    )
    _jsonl(run.metrics_file("sft"), _steps(4, 100.0, 1.0, 0.0, 0))
    _jsonl(run.metrics_file("rl"), _steps(20, 131.0, 0.1, 0.02, 1))
    _jsonl(
        run.system_file,
        [{"time_s": 100.0 + i, "phase": "sft" if i < 30 else "rl", "tasks": i % 5, "rollouts": 1, "scored": 2, "dead": 0}
         for i in range(60)],
    )  # fmt: skip
    _jsonl(
        run.eval_file,
        [
            {"phase": "sft", "when": "after", "step": 4, "accuracy": 0.25, "rubric_hit_rate": 0.5,
             "well_formed_rate": 0.9, "num_questions": 16},
            {"phase": "rl", "when": "after", "step": 24, "accuracy": 0.5, "rubric_hit_rate": 0.75,
             "well_formed_rate": 1.0, "num_questions": 16,
             "examples": [{"question": "q", "label": "C07", "response": "E17 </think> C07", "accuracy": 1.0}]},
        ],
    )  # fmt: skip
    return run


def test_report_writes_plots_and_summary(run_dir: RunDir) -> None:
    """Guards against a report that misses a plot, numbers steps per phase instead of run-wide, or gets the
    held-out gain of RL over SFT (the demo's success criterion) wrong."""
    path = write_report(run_dir.root)
    for name in ("reward", "throughput", "staleness", "queues"):
        png = run_dir.report_dir / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
    text = path.read_text()
    assert "| sft | sft | ok | 4 | 0m30s |" in text
    assert "| rl | rl | ok | 20 | 2m10s | 10.0 | 2.7 |" in text  # 6 s per step, 16 samples per step
    assert "0.210 → 0.410" in text  # RL reward 0.1 + 0.02 * step: means of steps 1-10 and 11-20
    assert "minus after SFT (0.250): **+0.250**" in text
    assert "- label `C07`, accuracy 1: `'E17 </think> C07'`" in text
    assert [m["global_step"] for m in run_dir.all_metrics()] == list(range(1, 25))


def test_phase_summary_counts_staleness_and_drops(run_dir: RunDir) -> None:
    """Guards against the staleness columns reading the wrong metric keys (they are written by the learner)."""
    rl = phase_summaries(run_dir)[1]
    assert rl["staleness_mean"] == 1.0
    assert rl["dropped_stale"] == 1.0
    assert rl["trained"] == 40.0
    assert mean_staleness({"staleness/0": 3.0, "staleness/2": 1.0}) == 0.5
    assert math.isnan(mean_staleness({}))


def test_report_of_a_failed_phase_says_so(run_dir: RunDir) -> None:
    """Guards against a report of an interrupted run that reads as if every phase had finished."""
    events = run_dir.phase_events()[:3] + [{"time_s": 150.0, "phase": "rl", "kind": "rl", "event": "end",
                                           "status": "interrupted", "index": 1}]  # fmt: skip
    _jsonl(run_dir.phases_file, events)
    assert "| rl | rl | interrupted |" in render_markdown(run_dir)


def test_report_cli_rejects_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Guards against `longtrace report` crashing with a traceback on a wrong path instead of naming it."""
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(tmp_path)])
    assert e.value.code == 2
    assert "not a `longtrace up` run directory" in capsys.readouterr().err


def test_dashboard_prints_one_line_per_step(run_dir: RunDir) -> None:
    """Guards against the non-TTY dashboard repeating or skipping steps, or dropping the fields a log reader
    needs (step, version, reward, accuracy, rubric hits, staleness, throughput, ETA)."""
    out = io.StringIO()
    dash = Dashboard(run_dir, "lines", out)
    dash.start_phase(PhaseView("rl", "rl", 1, 2, 30), sampler=None)
    dash.update()
    dash.update()
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("[rl]")]
    assert len(lines) == 20
    last = lines[-1]
    assert last.startswith("[rl] step 20/30 v20 ")
    assert "reward 0.500 acc 0.500 rubric 0.500 stale 1.00" in last
    assert "10.0 steps/min 2.7 samples/s" in last
    assert last.endswith("ETA 1m00s")  # 10 steps left at 6 s each
    sft = io.StringIO()
    dash = Dashboard(run_dir, "lines", sft)
    dash.start_phase(PhaseView("rl", "sft", 1, 2, 30), sampler=None)  # the same steps shown as an SFT phase
    dash.update()
    line = [ln for ln in sft.getvalue().splitlines() if ln.startswith("[rl]")][-1]
    assert "reward" not in line and " acc " not in line and "loss 0.050 stale" in line, line  # SFT has no reward


def test_dashboard_panel_shows_phase_progress_and_evaluations(run_dir: RunDir) -> None:
    """Guards against the live panel losing the phase progress, queue depths or held-out results."""
    dash = Dashboard(run_dir, "live", io.StringIO())
    dash.start_phase(PhaseView("rl", "rl", 1, 2, 40), sampler=None)
    dash.update()
    dash.system = {"tasks": 3, "rollouts": 1, "scored": 7, "dead": 0, "policy_version": 20, "engine_versions": [20]}
    panel = dash.panel()
    assert "phase 2/2" in panel and "step 20/40" in panel
    assert "tasks 3  rollouts 1  scored 7  dead 0" in panel
    assert "rl/after acc 0.500" in panel
    assert rates([])["steps_per_min"] != rates([])["steps_per_min"]  # NaN without two steps
