"""The layout of a `longtrace up` run directory and the readers of its files (the dashboard's and report's input).

    RUN_DIR/config.json              the resolved UpConfig
    RUN_DIR/logs/<process>.log       stdout+stderr of every child (redis, reward-api, <phase>-engine-0, ...)
    RUN_DIR/configs/<process>.toml   the resolved config each child was started with
    RUN_DIR/data/, RUN_DIR/model/    what [prepare] wrote
    RUN_DIR/phases/<phase>/          the learner's run_dir: metrics.jsonl, config.json, checkpoints/, exports/,
                                     tensorboard/ (the event files of TensorBoard, on by default)
    RUN_DIR/phases/<phase>/evals.jsonl  in-training held-out evaluations (`[eval] every_steps`, live_eval.py); the
                                     eval worker's requests and full results in evals/
    RUN_DIR/phases.jsonl             one line per phase start and end (steps, status, times)
    RUN_DIR/system.jsonl             samples of queue depths, policy version and engines (launcher, every refresh)
    RUN_DIR/eval.jsonl               held-out evaluations (deploy/launcher/evaluate.py)
    RUN_DIR/processes.json           every child's argv, pid and exit code (written at the end)
    RUN_DIR/report/                  `longtrace report`: PNG plots and report.md

The learner's metric keys that the dashboard and the report read are named here (learner/trainer.py and
learner/batching.py write them), so a renamed metric is fixed in one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.metrics import METRICS_FILE

# Learner metrics (one JSON object per optimizer step in metrics.jsonl).
STEP = "step"
TIME = "time_s"
REWARD = "reward_mean"
ACCURACY = "accuracy"  # outcome reward mean: the judge's verdict
RUBRIC_HITS = "raw_rubric_mean"  # fraction of rubric entities the answer names, before group normalisation
LOSS = "loss"
TOKENS_PER_S = "tokens_per_s"
STEP_S = "step_s"
POLICY_VERSION = "policy_version"
STALENESS_PREFIX = "staleness/"  # staleness/<lag>: groups of this step generated <lag> versions ago
GROUPS_ADMITTED = "groups_admitted"
GROUPS_TRAINED = "groups_trained"
GROUPS_DROPPED_STALE = "groups_dropped_stale"
GROUPS_DEAD = "groups_dead_lettered"
NUM_SAMPLES = "num_samples"

STREAMS = ("tasks", "rollouts", "scored", "dead")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; a torn last line (a writer mid-write) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def mean_staleness(metrics: dict[str, Any]) -> float:
    """Mean lag (versions) of a step's groups from its staleness/<lag> counts; NaN when there are none."""
    counts = {int(k[len(STALENESS_PREFIX) :]): v for k, v in metrics.items() if k.startswith(STALENESS_PREFIX)}
    total = sum(counts.values())
    return sum(lag * n for lag, n in counts.items()) / total if total else math.nan


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> RunDir:
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def phases_file(self) -> Path:
        return self.root / "phases.jsonl"

    @property
    def system_file(self) -> Path:
        return self.root / "system.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def processes_file(self) -> Path:
        return self.root / "processes.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def phase_dir(self, phase: str) -> Path:
        return self.root / "phases" / phase

    def metrics_file(self, phase: str) -> Path:
        return self.phase_dir(phase) / METRICS_FILE

    def live_evals_file(self, phase: str) -> Path:
        return self.phase_dir(phase) / "evals.jsonl"

    # -- readers

    def phase_names(self) -> list[str]:
        """Phases in the order they started (from phases.jsonl)."""
        names: list[str] = []
        for event in read_jsonl(self.phases_file):
            if event["phase"] not in names:
                names.append(event["phase"])
        return names

    def phase_events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.phases_file)

    def metrics(self, phase: str) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_file(phase))

    def all_metrics(self) -> list[dict[str, Any]]:
        """Every phase's steps in order, with `phase`, `phase_kind` and a run-wide `global_step` added."""
        kinds = {e["phase"]: e.get("kind", "") for e in self.phase_events()}
        out: list[dict[str, Any]] = []
        offset = 0
        for phase in self.phase_names():
            rows = self.metrics(phase)
            for m in rows:
                out.append({**m, "phase": phase, "phase_kind": kinds.get(phase, ""), "global_step": offset + m[STEP]})
            if rows:
                offset += int(rows[-1][STEP])
        return out

    def system(self) -> list[dict[str, Any]]:
        return read_jsonl(self.system_file)

    def evals(self) -> list[dict[str, Any]]:
        return read_jsonl(self.eval_file)

    def live_evals(self, phase: str) -> list[dict[str, Any]]:
        """The in-training evaluations of `phase` (ok and failed), in the order they ended."""
        return read_jsonl(self.live_evals_file(phase))
