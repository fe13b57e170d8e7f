"""Held-out evaluation DURING an RL phase (`[eval] every_steps = N`): every N learner steps the launcher runs the
eval core on the phase's serving engines, concurrently with the rollouts, without pausing training.

    phase start: the phase's eval worker (`python -m deploy.launcher.live_eval`), which loads the questions and the
      tokenizer once while the learner starts, then runs one eval per request file of phases/<phase>/evals/
      (k = 1 and the [eval] sampling of the evals between phases, `during_max_questions`, no version check)
    tick (the launcher's dashboard tick while the learner runs): the learner's last logged step (metrics.jsonl)
      -> LiveSchedule: due at N, 2N, ... below the phase's last step (its `eval_after` is that one); a due eval
         while the previous one still runs is skipped (logged), never queued
      -> a request step-<n>.request; the worker answers step-<n>.jsonl (the result) or step-<n>.error
    its end (a result, an error, the worker's exit, or `during_timeout_s` passed: the worker is stopped, and
    started again for the next eval)
      -> one line of RUN_DIR/phases/<phase>/evals.jsonl, status ok or failed (a failure never reads as accuracy 0)
      -> ok: `eval/accuracy` and `eval/rubric_mean` at the learner step, in an event file of the launcher's own in
         the phase's TensorBoard directory (beside the learner's curves)

The engines take a weight push after every learner step, so the weights may advance during an eval: each line
records the oldest and newest policy version the engines reported for its samples' tokens (policy_version_min /
max). A failed eval does not fail the run: the supervisor is told not to watch the worker (`Child.stopping`), the
launcher reads its state; a run that stops, stops the worker with every other process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from common.supervisor import Child, ProcessSpec, Supervisor
from deploy.launcher import specs
from deploy.launcher.evaluate import EvalJobConfig
from deploy.launcher.rundir import STEP, read_jsonl
from deploy.launcher.sections import PhaseConfig
from deploy.launcher.tomlfile import write_config

if TYPE_CHECKING:
    from deploy.launcher.up import Launcher

log = logging.getLogger(__name__)

ACCURACY_TAG = "eval/accuracy"
RUBRIC_TAG = "eval/rubric_mean"
STOP_GRACE_S = 5.0
"""The worker of a timed-out eval gets this long after SIGTERM before SIGKILL."""


@dataclass
class LiveSchedule:
    """When an in-training eval is due: at every multiple of `every_steps` below `last_step`, once each; several
    multiples passed between two ticks make one eval (at the step seen)."""

    every_steps: int
    last_step: int
    next_due: int = 0

    def __post_init__(self) -> None:
        self.next_due = self.every_steps

    def poll(self, step: int, running: bool) -> Literal["start", "skip"] | None:
        """`start` an eval at `step`, `skip` it (one runs: never two at once, never queued), or None (not due)."""
        if self.every_steps <= 0 or step < self.next_due or step >= self.last_step:
            return None
        self.next_due = (step // self.every_steps + 1) * self.every_steps
        return "skip" if running else "start"


def request_path(requests: Path, step: int) -> Path:
    return requests / f"step-{step:06d}.request"


def result_path(requests: Path, step: int) -> Path:
    return requests / f"step-{step:06d}.jsonl"


def error_path(requests: Path, step: int) -> Path:
    return requests / f"step-{step:06d}.error"


@dataclass
class Running:
    step: int
    started_s: float


class LiveEval:
    """The in-training evals of one phase: `start_worker` once, `tick` while the learner runs, `finish` once it
    has ended (waits for a running eval, at most its timeout, and stops the worker)."""

    def __init__(
        self,
        sup: Supervisor,
        schedule: LiveSchedule,
        evals_file: Path,
        requests: Path,
        worker: ProcessSpec,
        current_step: Callable[[], int],
        timeout_s: float,
        split: str,
        tensorboard_dir: Path | None = None,
        note: Callable[[str], None] = log.info,
    ) -> None:
        self.sup = sup
        self.schedule = schedule
        self.evals_file = evals_file
        self.requests = requests
        """The directory of the worker's requests and answers."""
        self.worker_spec = worker
        self.current_step = current_step
        self.timeout_s = timeout_s
        self.split = split
        self.tensorboard_dir = tensorboard_dir
        self.note = note
        self.worker: Child | None = None
        self.running: Running | None = None
        self._writer: Any = None

    def start_worker(self) -> Child:
        """The worker, started (again, after it ended or was stopped) when it does not run."""
        if self.worker is not None and self.worker.returncode is None:
            return self.worker
        self.requests.mkdir(parents=True, exist_ok=True)
        for stale in self.requests.glob("*.request"):
            stale.unlink()  # the request of a stopped worker: not to be answered by the next one
        if self.worker is None:
            self.worker = self.sup.start(self.worker_spec, wait_ready=False)
        else:
            self.sup.respawn(self.worker, wait_ready=False)
        # Its state is read here: a failed eval is recorded as failed, it does not fail the run.
        self.worker.stopping = True
        return self.worker

    def tick(self) -> None:
        self._reap()
        step = self.current_step()
        action = self.schedule.poll(step, self.running is not None)
        if action == "skip":
            assert self.running is not None
            self.note(f"in-training eval at step {step} skipped: the one of step {self.running.step} still runs")
        elif action == "start":
            self.start_worker()
            for path in (result_path(self.requests, step), error_path(self.requests, step)):
                path.unlink(missing_ok=True)
            request = request_path(self.requests, step)
            tmp = request.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            tmp.rename(request)  # the worker never reads half a request
            self.running = Running(step, time.monotonic())
            self.note(f"in-training eval at step {step} started")

    def finish(self) -> None:
        while self.running is not None:
            self.sup.check()
            self._reap()
            time.sleep(0.1)
        if self.worker is not None:
            self.sup.stop(self.worker)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _reap(self) -> None:
        run = self.running
        if run is None:
            return
        lines = read_jsonl(result_path(self.requests, run.step))
        failed = error_path(self.requests, run.step)
        wall_s = time.monotonic() - run.started_s
        if lines:
            error = ""
        elif failed.is_file():
            error = failed.read_text().strip() or "failed"
        elif self.worker is None or self.worker.returncode is not None:
            code = self.worker.returncode if self.worker is not None else None
            last = self.worker.log_tail(1).strip() if self.worker is not None else ""
            error = f"the eval worker exited with code {code}" + (f": {last}" if last else "")
        elif wall_s > self.timeout_s:
            self.sup.stop(self.worker, STOP_GRACE_S)
            error = f"stopped after {self.timeout_s:.0f}s (--eval.during_timeout_s)"
        else:
            return
        self.running = None
        self.record(run.step, None if error else lines[-1], wall_s, error)

    def record(self, step: int, result: dict[str, Any] | None, wall_s: float, error: str = "") -> dict[str, Any]:
        """Append the eval's line to evals.jsonl (and its scalars to TensorBoard when it succeeded)."""
        r = result or {}
        line: dict[str, Any] = {
            "step": step,
            "status": "ok" if result is not None else "failed",
            "accuracy": r.get("accuracy"),
            "rubric_mean": r.get("rubric_hit_rate"),
            "num_questions": r.get("num_questions"),
            "policy_version_min": r.get("policy_version_min"),
            "policy_version_max": r.get("policy_version_max"),
            "wall_s": round(wall_s, 2),
            "eval_s": r.get("eval_s"),
            "split": self.split,
            "time_s": round(time.time(), 3),
            **({"error": error} if error else {}),
        }
        self.evals_file.parent.mkdir(parents=True, exist_ok=True)
        with self.evals_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        if result is None:
            log.warning("in-training eval at step %d failed: %s", step, error)
            self.note(f"in-training eval at step {step} FAILED: {error}")
            return line
        self.note(
            f"in-training eval at step {step}: accuracy {line['accuracy']:.3f} rubric {line['rubric_mean']:.3f} "
            f"(versions {line['policy_version_min']}..{line['policy_version_max']}, {wall_s:.1f}s)"
        )
        self._tensorboard(step, float(line["accuracy"]), float(line["rubric_mean"]))
        return line

    def open_tensorboard(self) -> None:
        """The event file, opened before the learner steps: importing torch blocks the launcher's ticks for
        seconds, which would let a fast learner pass the steps of the next evals unseen."""
        if self.tensorboard_dir is None or self._writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), filename_suffix=".live_eval")
        except Exception as e:  # a tracker never stops the run (as the learner's trackers)
            log.warning("TensorBoard off for the in-training evals: %s: %s", type(e).__name__, e)
            self.tensorboard_dir = None

    def _tensorboard(self, step: int, accuracy: float, rubric: float) -> None:
        self.open_tensorboard()
        if self._writer is None:
            return
        try:
            self._writer.add_scalar(ACCURACY_TAG, accuracy, step)
            self._writer.add_scalar(RUBRIC_TAG, rubric, step)
            self._writer.flush()
        except Exception as e:  # a tracker never stops the run (as the learner's trackers)
            log.warning("TensorBoard off for the in-training evals: %s: %s", type(e).__name__, e)
            self.tensorboard_dir = None


def eval_job(
    launcher: Launcher, phase: str, when: str, engine_urls: list[str], model: str, **fields: Any
) -> EvalJobConfig:
    """An eval of `phase` on its engines: the [eval] section, the launcher's reward API and the rollout workers'
    processor; `fields` (out_path, step, expect_version, max_questions, ...) go over them."""
    cfg = launcher.cfg
    base: dict[str, Any] = {
        **cfg.eval.model_dump(exclude={"dataset_path"}),
        "engine_urls": engine_urls,
        "reward_url": launcher.reward_url,
        "dataset_path": cfg.eval_dataset_path(),
        "tokenizer_path": model,
        "phase": phase,
        "when": when,
        "processor": cfg.rollout_config(launcher.child_redis_url, phase, 0).processor,
    }
    return EvalJobConfig(**{**base, **fields})


def start_live_eval(
    launcher: Launcher, name: str, phase: PhaseConfig, engine_urls: list[str], model: str
) -> LiveEval | None:
    """The in-training evals of phase `name`, its worker started (None unless an RL phase with `every_steps`)."""
    e = launcher.cfg.eval
    if phase.kind != "rl" or not e.every_steps:
        return None
    run = launcher.run
    requests = run.phase_dir(name) / "evals"
    cfg = eval_job(
        launcher, name, "during", engine_urls, model, out_path="", expect_version=None,
        max_questions=e.during_max_questions,
    )  # fmt: skip
    worker = f"{name}-eval-worker"
    path = write_config(cfg, run.configs / f"{worker}.toml")

    def current_step() -> int:
        steps = launcher.dashboard.steps  # metrics.jsonl, read by the dashboard on every tick
        return int(steps[-1][STEP]) if steps else 0

    live = LiveEval(
        launcher.sup,
        LiveSchedule(e.every_steps, phase.steps),
        run.live_evals_file(name),
        requests,
        specs.eval_worker(worker, str(path), str(requests)),
        current_step,
        e.during_timeout_s,
        e.split if not e.dataset_path else "dataset_path",
        launcher.cfg.tensorboard_dirs().get(name),
        launcher.dashboard.note,
    )
    live.start_worker()
    live.open_tensorboard()
    return live


def serve(cfg: EvalJobConfig, requests: Path, poll_s: float = 0.1) -> None:
    """The eval worker: the questions and the tokenizer loaded once, then one eval per request file (step order)
    until stopped; an eval that fails writes its error (step-<n>.error) and the worker goes on."""
    from deploy.launcher.evaluate import eval_config
    from deploy.launcher.evaluate import run as evaluate
    from eval.run import prepare

    inputs = prepare(eval_config(cfg))
    log.info("eval worker ready: %d questions", len(inputs.ids))
    while True:
        for request in sorted(requests.glob("step-*.request")):
            step = int(json.loads(request.read_text())["step"])
            out = result_path(requests, step)
            try:
                result = evaluate(cfg.model_copy(update={"step": step, "out_path": str(out)}), inputs)
                log.info("step %d: accuracy %.3f on %d questions", step, result["accuracy"], result["num_questions"])
            except Exception as e:  # recorded by the launcher as a failed eval; the next one may succeed
                log.exception("the eval of step %d failed", step)
                tmp = error_path(requests, step).with_suffix(".tmp")
                tmp.write_text(f"{type(e).__name__}: {e}"[:2000])
                tmp.rename(error_path(requests, step))
            request.unlink(missing_ok=True)
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from common.cli import Logs, add_config, run_cli, standalone
    from common.config import load_config

    def worker(args: argparse.Namespace) -> int:
        serve(load_config(EvalJobConfig, args.config), Path(args.requests))
        return 0

    parser = standalone(
        "python -m deploy.launcher.live_eval", worker, logs=Logs(prefix="eval-worker "), description=__doc__
    )
    add_config(parser, "TOML file of an EvalJobConfig (out_path and step: set per request)", required=True)
    parser.add_argument("--requests", required=True, help="directory of the request files and the answers")
    run_cli(parser, argv)


if __name__ == "__main__":
    main()
