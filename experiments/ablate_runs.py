"""The runs of `longtrace ablate`: one `longtrace up` subprocess per run, and what the ablation reads back from its
run directory (the SFT export, the RL exports per step, the per-sample records of each, the launcher's own
evaluation, the training tail, the config the run really used). experiments/ablate.py plans and orders the runs.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import ConfigError
from experiments.ablate_samples import evaluate_export, read_samples, write_samples
from experiments.ablate_summary import mean

if TYPE_CHECKING:
    from experiments.ablate import Plan

log = logging.getLogger("experiments.ablate")
"""The ablation's logger: `longtrace ablate` sets its level (experiments/ablate_cli.py)."""


def _finished(run_dir: Path) -> bool:
    """Every phase of a `longtrace up` run ended ok."""
    from deploy.launcher.rundir import RunDir

    events = RunDir.at(run_dir).phase_events()
    starts = {e["phase"] for e in events if e["event"] == "start"}
    oks = {e["phase"] for e in events if e["event"] == "end" and e.get("status") == "ok"}
    return bool(starts) and starts == oks


def run_up(plan: Plan, d: dict[str, Any], name: str, timeout_s: float) -> float:
    """`longtrace up` on `d` in a subprocess (its own signal handling and process tree); wall seconds."""
    from deploy.launcher.tomlfile import write_config

    run_dir = Path(d["run_dir"])
    if run_dir.exists():
        if plan.cfg.reuse_finished_runs and _finished(run_dir):
            log.info("%s: reusing the finished run %s", name, run_dir)
            return math.nan
        if plan.cfg.reuse_finished_runs and not (run_dir / "phases.jsonl").exists():
            shutil.rmtree(run_dir)
        else:
            raise ConfigError(f"--out_dir: {run_dir} exists; choose another --out_dir (or --reuse_finished_runs)")
    path = write_config(plan.resolve(d, name), plan.out / "configs" / f"{name}.toml")
    log_path = plan.out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "deploy.cli", "up", str(path), "--no-dashboard"]
    log.info("%s: %s (log %s)", name, " ".join(argv), log_path)
    t0 = time.monotonic()
    with log_path.open("w") as out:
        try:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = -1
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{name}: longtrace up exited {code} (log {log_path}):\n{tail}")
    return time.monotonic() - t0


def sft_export(plan: Plan, seed: int) -> Path:
    from weights.exports import latest_export

    found = latest_export(plan.run_dir(seed, "sft") / "phases" / plan.cfg.sft_phase / "exports")
    if found is None:
        raise RuntimeError(f"seed {seed}: the SFT run left no export")
    return found[0]


def export_steps(plan: Plan, run_dir: Path) -> dict[int, Path]:
    """RL step -> the HF export of the weights after it (policy versions mapped to steps by metrics.jsonl). A step
    whose export was pruned after its evaluation counts while its samples file exists, so a reused run
    (`--reuse_finished_runs`) keeps its whole curve."""
    from deploy.launcher.rundir import POLICY_VERSION, STEP, RunDir
    from weights.exports import export_name

    exports = run_dir / "phases" / plan.cfg.rl_phase / "exports"
    out = {}
    for m in RunDir.at(run_dir).metrics(plan.cfg.rl_phase):
        step, path = int(m[STEP]), exports / export_name(int(m[POLICY_VERSION]))
        if step in plan.eval_steps and (path.is_dir() or (run_dir / "samples" / f"step-{step}.jsonl").is_file()):
            out[step] = path
    return out


_EVAL_LOCK = threading.Lock()
"""One evaluation at a time: transformers' lazy imports are not thread-safe, and two would share 2 cores anyway."""


def samples_at(plan: Plan, up: Any, model_dir: Path, path: Path) -> list[dict[str, Any]]:
    """The per-sample records of one model: read when the file exists (ours, or `longtrace eval`'s), else made."""
    if path.is_file():
        return read_samples(path)
    from deploy.launcher.config import PLACEHOLDER_REDIS_URL

    phase = next(iter(up.phases))
    with _EVAL_LOCK:
        records = evaluate_export(
            model_dir,
            up.eval_dataset_path(),
            up.reward_config(PLACEHOLDER_REDIS_URL, phase, 0),
            processor=up.rollout_config(PLACEHOLDER_REDIS_URL, phase, 0).processor,
            max_questions=plan.cfg.eval_max_questions or up.eval.max_questions,
            max_new_tokens=up.eval.max_new_tokens,
            stop_token_ids=up.eval.stop_token_ids,
        )
    write_samples(path, records)
    return records


def used_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json as UpConfig reads it today: a field added since an older (reused) run was made takes
    its default in every run alike, instead of showing up as a difference of that run alone."""
    from deploy.launcher.config import UpConfig

    raw = json.loads((run_dir / "config.json").read_text())
    return UpConfig.model_validate(raw).model_dump(mode="json")


def prune_exports(exports: Path) -> None:
    from weights.exports import latest_export

    found = latest_export(exports)
    for p in exports.glob("v*"):
        if p.is_dir() and (found is None or p.resolve() != found[0]):
            shutil.rmtree(p, ignore_errors=True)


def system_eval(run_dir: Path) -> dict[str, Any]:
    """The launcher's own (engine) evaluation after the run's last phase, from eval.jsonl."""
    from deploy.launcher.rundir import RunDir

    after = [e for e in RunDir.at(run_dir).evals() if e["when"] == "after"]
    if not after:
        return {}
    keys = ("accuracy", "rubric_hit_rate", "well_formed_rate", "response_len_mean", "num_questions")
    return {k: after[-1][k] for k in keys}


def train_tail(run_dir: Path, phase: str) -> dict[str, float]:
    """Training-group figures over the last 10 RL steps (metrics.jsonl)."""
    from deploy.launcher.rundir import RunDir

    rows = RunDir.at(run_dir).metrics(phase)[-10:]
    keys = ("reward_mean", "outcome_mean", "raw_rubric_mean", "zeroed_fraction", "truncated_fraction")
    return {k: mean([float(r[k]) for r in rows if k in r]) for k in keys}
