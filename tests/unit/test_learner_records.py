"""What the learner writes to disk for others to rely on: the state and `latest` made durable before the acks that
depend on them, and metrics.jsonl with the ids of the groups each step trained (readable by the report)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest

from learner.metrics import JsonlMetricsLogger, read_metrics, trained_lineage
from learner.state import LearnerState


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths fsynced from here on, in order (the real fsync still runs)."""
    paths: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return paths


def test_the_learner_state_is_fsynced_file_and_directory(tmp_path: Path, fsynced: list[str]) -> None:
    """Guards against a checkpoint's state living only in the page cache when the scored entries it covers are acked:
    a power loss would bring back an older state (or none) whose groups Redis no longer has."""
    path = tmp_path / "step_00000002" / "learner_state.json"
    path.parent.mkdir()
    LearnerState(step=2).save(path)
    assert LearnerState.load(path).step == 2
    assert fsynced == [str(path.parent / ".learner_state.json.tmp"), str(path.parent)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["learner_state.json"]  # no temporary left behind


def test_a_checkpoint_commit_makes_the_state_then_latest_durable(tmp_path: Path, fsynced: list[str]) -> None:
    """Guards against `latest` naming a checkpoint whose state file is not durable yet, and against a `latest`
    (file or rename) that a power loss undoes after the acks it allowed: the state first, then `latest`, each
    fsynced with its directory before commit returns (the checkpointer acks only after it)."""
    from learner.checkpoint import LATEST, STATE_FILE, commit, latest_checkpoint

    step_dir = tmp_path / "step_00000004"
    step_dir.mkdir()
    commit(tmp_path, step_dir, LearnerState(step=4))
    assert latest_checkpoint(tmp_path) == step_dir
    assert fsynced == [
        str(step_dir / f".{STATE_FILE}.tmp"),
        str(step_dir),
        str(tmp_path / f".{LATEST}.tmp"),
        str(tmp_path),
    ]


def test_metrics_lines_carry_the_trained_group_ids_and_the_report_reads_them(tmp_path: Path) -> None:
    """Guards the independent record a chaos bench counts duplicates and losses from: each step's line lists the
    groups it trained and those given up on, by cause (flushed at once, so it survives a kill), and a list value must not break the readers of metrics.jsonl
    (longtrace report, the dashboard, the run directory's helpers)."""
    from deploy.launcher.dashboard import Dashboard, PhaseView
    from deploy.launcher.rundir import RunDir, mean_staleness
    from deploy.report import phase_summaries, write_report

    run = RunDir.at(tmp_path / "run")
    run.phases_file.parent.mkdir(parents=True)
    events = [
        {"time_s": 100.0, "phase": "rl", "kind": "rl", "event": "start", "steps": 3, "index": 0},
        {"time_s": 130.0, "phase": "rl", "kind": "rl", "event": "end", "status": "ok", "index": 0},
    ]
    run.phases_file.write_text("".join(json.dumps(e) + "\n" for e in events))
    logger = JsonlMetricsLogger(run.phase_dir("rl"))
    for step in (1, 2, 3):
        metrics = {"loss": 1.0 / step, "reward_mean": 0.1 * step, "staleness/0": 2.0, "grad_norm": math.nan}
        metrics |= {"groups_trained": 2.0 * step, "policy_version": float(step), "num_samples": 4.0}
        released = {"stale": ["rl/e0/i1"], "judge": ["rl/e0/i0"]} if step == 2 else None
        logger.log(step, metrics, [f"rl/e0/i{2 * step}", f"rl/e0/i{2 * step + 1}"], released)
        if step == 2:  # read while the logger is still open: each line is on disk when log returns
            assert [m["step"] for m in read_metrics(run.phase_dir("rl"))] == [1, 2]
    logger.close()

    lines = read_metrics(run.phase_dir("rl"))
    assert [m["trained_group_ids"] for m in lines] == [["rl/e0/i2", "rl/e0/i3"], ["rl/e0/i4", "rl/e0/i5"],
                                                       ["rl/e0/i6", "rl/e0/i7"]]  # fmt: skip
    assert [m["released_group_ids"] for m in lines] == [{}, {"stale": ["rl/e0/i1"], "judge": ["rl/e0/i0"]}, {}]
    assert lines[0]["grad_norm"] is None  # non-finite floats are written as null
    # A learner killed after step 3 and resumed from its checkpoint at step 1 logs steps 2 and 3 again.
    retrained = [{"step": 2, "trained_group_ids": ["rl/e0/i4", "rl/e0/i5"]}, {"step": 3, "trained_group_ids": ["x"]}]
    assert trained_lineage(lines + retrained) == {1: ["rl/e0/i2", "rl/e0/i3"], 2: ["rl/e0/i4", "rl/e0/i5"], 3: ["x"]}
    assert trained_lineage(lines + retrained[:1]) == {1: ["rl/e0/i2", "rl/e0/i3"], 2: ["rl/e0/i4", "rl/e0/i5"]}
    assert [m["step"] for m in run.metrics("rl")] == [1, 2, 3] and mean_staleness(lines[0]) == 0.0
    assert phase_summaries(run)[0]["trained"] == 6.0
    assert write_report(run.root).is_file()
    out = io.StringIO()
    dash = Dashboard(run, "lines", out)
    dash.start_phase(PhaseView("rl", "rl", 0, 1, 3), sampler=None)
    dash.update()
    assert len([ln for ln in out.getvalue().splitlines() if ln.startswith("[rl]")]) == 3
