"""The in-training evals' schedule and bookkeeping (deploy/launcher/live_eval.py), with a real Supervisor running a
stand-in eval worker (a tiny Python process answering the request files as told) instead of the eval core."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from common.supervisor import ProcessSpec, Supervisor
from deploy.launcher.live_eval import LiveEval, LiveSchedule
from deploy.launcher.rundir import read_jsonl

RESULT = {"accuracy": 0.5, "rubric_hit_rate": 0.25, "num_questions": 8, "eval_s": 0.1}
RESULT |= {"policy_version_min": 3, "policy_version_max": 5}
# The stand-in worker: per request, ANSWER (Python run with `step` and `d`, the request directory, set).
WORKER = """
import json, pathlib, sys, time
d = pathlib.Path(sys.argv[1])
while True:
    for r in sorted(d.glob("step-*.request")):
        step = json.loads(r.read_text())["step"]
        ANSWER
        r.unlink()
    time.sleep(0.02)
"""
OK = f"time.sleep(0.5); (d / f'step-{{step:06d}}.jsonl').write_text(json.dumps({RESULT!r}) + '\\n')"


def test_schedule_is_due_once_per_multiple_and_skips_while_one_runs() -> None:
    """Guards against the schedule starting an eval twice for one step, queueing a skipped one (evals piling up
    behind a slow one), starting a second eval while one runs, or evaluating at the phase's last step (its
    eval_after does)."""
    s = LiveSchedule(every_steps=4, last_step=16)
    assert [s.poll(step, running=False) for step in range(4)] == [None] * 4
    assert s.poll(4, running=False) == "start"
    assert s.poll(4, running=False) is None  # the same step seen on the next tick
    assert s.poll(7, running=True) is None
    assert s.poll(8, running=True) == "skip"  # one at a time
    assert s.poll(9, running=False) is None  # a skipped eval is not queued
    assert s.poll(13, running=False) == "start"  # 12 passed between two ticks: one eval, at the step seen
    assert s.next_due == 16
    assert s.poll(16, running=False) is None and s.poll(20, running=False) is None  # the last step: eval_after's
    off = LiveSchedule(every_steps=0, last_step=16)
    assert all(off.poll(step, running=False) is None for step in range(20))


def _live(tmp_path: Path, answer: str, step: list[int], timeout_s: float = 30.0) -> tuple[LiveEval, list[str]]:
    notes: list[str] = []
    requests = tmp_path / "evals"
    argv = [sys.executable, "-c", WORKER.replace("ANSWER", answer), str(requests)]
    live = LiveEval(
        Supervisor(tmp_path / "logs", poll_s=0.02), LiveSchedule(2, 100), tmp_path / "evals.jsonl", requests,
        ProcessSpec("eval-worker", argv, stop_timeout_s=2.0), lambda: step[0], timeout_s, "heldout",
        note=notes.append,
    )  # fmt: skip
    live.start_worker()
    return live, notes


def _wait(live: LiveEval) -> None:
    while live.running is not None:
        live.tick()
        time.sleep(0.02)


def test_an_eval_result_becomes_one_line_with_its_versions(tmp_path: Path) -> None:
    """Guards against an in-training eval's line missing its step, accuracy, rubric mean, question count, wall
    time, split or the policy versions of its samples (the weights may advance during an eval), a due eval
    started while one runs, and a worker left running after the phase."""
    step = [2]
    live, notes = _live(tmp_path, OK, step)
    live.tick()
    assert live.running is not None and live.running.step == 2
    step[0] = 4
    live.tick()  # due while step 2's eval runs: skipped, noted
    assert live.running.step == 2 and any("step 4 skipped" in n for n in notes)
    _wait(live)
    step[0] = 6
    live.tick()  # the same worker answers the next one
    _wait(live)
    live.finish()
    assert live.worker is not None and live.worker.returncode is not None  # stopped with the phase
    lines = read_jsonl(tmp_path / "evals.jsonl")
    assert [line["step"] for line in lines] == [2, 6]
    assert lines[0] | {"time_s": 0, "wall_s": 0} == {
        "step": 2, "status": "ok", "accuracy": 0.5, "rubric_mean": 0.25, "num_questions": 8, "policy_version_min": 3,
        "policy_version_max": 5, "wall_s": 0, "eval_s": 0.1, "split": "heldout", "time_s": 0,
    }  # fmt: skip
    assert 0.4 < lines[0]["wall_s"] < 30


@pytest.mark.parametrize(
    ("answer", "timeout_s", "error"),
    [
        ("(d / f'step-{step:06d}.error').write_text('EvalError: engine refused')", 30.0, "EvalError: engine refused"),
        ("print('worker crashed'); sys.exit(3)", 30.0, "the eval worker exited with code 3: worker crashed"),
        ("time.sleep(60)", 0.5, "stopped after"),
    ],
    ids=["error", "worker-exit", "timeout"],
)
def test_a_failed_eval_is_recorded_as_failed_and_the_run_goes_on(
    tmp_path: Path, answer: str, timeout_s: float, error: str
) -> None:
    """Guards against a failed, crashed or hung in-training eval failing the whole run (the supervisor must not
    treat the worker's exit as a child failure), hanging the phase past its timeout, reading as accuracy 0, or
    leaving no worker for the next eval."""
    step = [2]
    live, notes = _live(tmp_path, answer, step, timeout_s)
    t0 = time.monotonic()
    live.tick()
    _wait(live)
    assert time.monotonic() - t0 < 20
    live.sup.check()  # no ChildFailed: the run goes on
    (line,) = read_jsonl(tmp_path / "evals.jsonl")
    assert line["status"] == "failed" and error in line["error"], line
    assert line["accuracy"] is None and line["rubric_mean"] is None  # never a 0 accuracy
    assert any("FAILED" in n for n in notes)
    step[0] = 4
    live.tick()  # the next eval gets a worker again
    assert live.running is not None and live.worker is not None and live.worker.returncode is None
    live.finish()
    assert json.dumps(read_jsonl(tmp_path / "evals.jsonl"))  # strict JSON


def test_report_plots_and_summarizes_only_succeeded_evals(tmp_path: Path) -> None:
    """Guards against the report drawing a failed in-training eval as accuracy 0 (or dropping it from report.md
    without a word), and against summary.json's `heldout.during_rl` missing or taking another phase's evals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deploy.launcher.rundir import RunDir
    from deploy.report_evals import during_rl, live_eval_lines, plot_live_evals

    run = RunDir.at(tmp_path)
    events = [{"phase": "rl", "kind": "rl", "event": "start"}, {"phase": "rl", "kind": "rl", "event": "end"}]
    run.phases_file.write_text("".join(json.dumps(e) + "\n" for e in events))
    run.metrics_file("rl").parent.mkdir(parents=True)
    run.metrics_file("rl").write_text(json.dumps({"step": 30}) + "\n")
    ok = {"status": "ok", "rubric_mean": 0.5, "policy_version_min": 10, "policy_version_max": 11, "wall_s": 2.0}
    lines = [
        {**ok, "step": 10, "accuracy": 0.25, "num_questions": 8},
        {"step": 20, "status": "failed", "accuracy": None, "wall_s": 60.0, "error": "stopped after 60s"},
        {**ok, "step": 25, "accuracy": 0.5, "num_questions": 8},
    ]
    run.live_evals_file("rl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert during_rl(run) == [{"step": 10, "accuracy": 0.25}, {"step": 25, "accuracy": 0.5}]
    md = "\n".join(live_eval_lines(run))
    assert "| rl | 20 | failed: stopped after 60s | - | - |" in md and "| rl | 25 | ok | 0.500 | 0.500 |" in md
    assert plot_live_evals(plt, run, tmp_path / "curve.png") and (tmp_path / "curve.png").stat().st_size > 0
    assert not plot_live_evals(plt, RunDir.at(tmp_path / "none"), tmp_path / "none.png")  # no evals: no plot
