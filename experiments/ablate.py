"""`longtrace ablate CONFIG`: the demo task under reward variants, several seeds each (issue 13).

    for each seed:   longtrace up  [prepare + SFT phase]             -> OUT/seed-<s>/sft      (shared warm start)
      for each variant:  longtrace up  [RL phase from the SFT export] -> OUT/seed-<s>/<variant>
        per-sample held-out records of the SFT export and of the RL exports every `eval_every_steps` steps
    summary (OUT/ablation.json) and the report (OUT/report/: variants plot, bars, ablation.md)

Variants differ only in the reward rule: each variant's UpConfig is the same dict with `reward.config.eta` and
`reward.config.combination` set, and the resolved configs are diffed before (planned) and after (the run
directories' config.json) the runs; any other difference is an error. Outcome-only is η = 0.

Held-out accuracy over steps without a mid-phase evaluation in the launcher: the RL phase keeps every HF
export the weight sync writes (`export_keep_last` above the step count; the demo already exports at every
push), and after the run `experiments/ablate_samples.py` evaluates the exports of the wanted steps. The RL phase
stays one phase, so its optimizer, KL reference (the SFT export) and data order are those of `longtrace up`.
The launcher's own engine evaluation after the phase is kept as a cross-check of the final step.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from common.config import BaseConfig, ConfigError, load_config, merge_tables
from experiments.ablate_samples import HackingConfig, evaluate_export, indicators, read_samples, write_samples

log = logging.getLogger(__name__)

ABLATION_FILE = "ablation.json"
REWARD_RULE_KEYS = frozenset({"reward.config.eta", "reward.config.combination"})
BOOKKEEPING_KEYS = frozenset({"run_dir", "run_id"})
"""Keys that name where a run lives; they differ between any two runs and change nothing they compute."""
PAPER: dict[str, Any] = {
    "source": "LongTraceRL ablations, Qwen3-4B, average score (docs: ../shared/docs/METHOD.md)",
    "outcome_only": 53.7,
    "positive_only": 59.0,
    "both": 57.1,
    "eta": {"0.1": 58.3, "0.3": 59.0, "0.5": 57.1},
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class Variant(BaseConfig):
    name: str
    """Lower-case letters, digits and _ (it names the run directory and the broker namespace)."""
    eta: float = Field(ge=0, le=1)
    """η, the rubric weight (0: outcome only)."""
    combination: str = "positive_only"
    """positive_only (the paper), both (rubric paid on every sample) or negative_only."""

    @model_validator(mode="after")
    def _check(self) -> Variant:
        if not _NAME.match(self.name):
            raise ValueError(f"variant name {self.name!r}: use lower-case letters, digits and _")
        if self.combination not in ("positive_only", "negative_only", "both"):
            raise ValueError(f"variant {self.name}: combination must be positive_only, negative_only or both")
        return self


DEFAULT_VARIANTS = [
    Variant(name="outcome_only", eta=0.0, combination="positive_only"),
    Variant(name="positive_only", eta=0.3, combination="positive_only"),
    Variant(name="both", eta=0.3, combination="both"),
]


class AblateConfig(BaseConfig):
    up_config: str = "configs/demo.toml"
    """The UpConfig TOML of the task (prepare, an SFT phase and an RL phase)."""
    up: dict[str, Any] = {}
    """UpConfig keys merged over `up_config` for every run (e.g. `--up.phases.rl.steps 60`)."""
    out_dir: str = "runs/ablate"
    """Where the runs (seed-<s>/sft, seed-<s>/<variant>), ablation.json and report/ go."""
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    """Seeds: each sets prepare.seed (world, data, model init) and the learner's data.seed."""
    variants: list[Variant] = Field(default_factory=lambda: list(DEFAULT_VARIANTS), min_length=1)
    """Reward variants (`[[variants]]` tables)."""
    eta_sweep: list[float] = []
    """Adds a positive_only variant `eta_<100η>` per value (e.g. [0.1, 0.5]; 0.3 is `positive_only`)."""
    sft_phase: str = "sft"
    """Name of the SFT phase in `up_config`."""
    rl_phase: str = "rl"
    """Name of the RL phase in `up_config`."""
    eval_every_steps: int = Field(25, ge=1)
    """Held-out accuracy is measured at RL steps 0, k, 2k, ... and the last step."""
    eval_max_questions: int = Field(0, ge=0)
    """Held-out questions per evaluation; 0: the UpConfig's eval.max_questions."""
    max_parallel: int = Field(1, ge=1, le=2)
    """Runs at a time (1 or 2: the machine has 2 cores)."""
    reuse_finished_runs: bool = False
    """Reuse a run directory whose phases all finished (rerun only what is missing); off: such a directory is an
    error."""
    keep_exports: bool = False
    """Keep every RL export after evaluation; off: only the newest one is kept."""
    hacking: HackingConfig = Field(default_factory=HackingConfig)
    """The hacking indicator (experiments/ablate_samples.py)."""
    run_timeout_s: float = Field(3600.0, gt=0)
    """One `longtrace up` run that takes longer fails the ablation."""

    def all_variants(self) -> list[Variant]:
        extra = [Variant(name=f"eta_{round(e * 100):d}", eta=e) for e in self.eta_sweep]
        out = [*self.variants, *extra]
        names = [v.name for v in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"--variants / --eta_sweep: duplicate variant names {dup}")
        return out


# -- resolved configs


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """Dotted keys whose values differ between two resolved configs: {key: [a's, b's]} (missing: None)."""
    fa, fb = _flatten(a), _flatten(b)
    return {k: [fa.get(k), fb.get(k)] for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


def check_reward_only(configs: dict[str, dict[str, Any]], where: str) -> dict[str, dict[str, list[Any]]]:
    """Diffs of every config against the first; ValueError when one differs outside the reward rule."""
    names = list(configs)
    diffs = {}
    for name in names[1:]:
        diff = config_diff(configs[names[0]], configs[name])
        other = sorted(set(diff) - REWARD_RULE_KEYS - BOOKKEEPING_KEYS)
        if other:
            raise ValueError(
                f"{where}: variants {names[0]!r} and {name!r} differ in {other}, not only in the reward rule "
                f"({sorted(REWARD_RULE_KEYS)})"
            )
        diffs[name] = {k: v for k, v in diff.items() if k in REWARD_RULE_KEYS}
    return diffs


class Plan:
    """The UpConfig dicts of every run, before any of them starts."""

    def __init__(self, cfg: AblateConfig) -> None:
        import tomllib

        from deploy.launcher.config import UpConfig

        self.cfg = cfg
        # Absolute: `longtrace up` hands RUN_DIR/redis to redis-server, which resolves its log file after chdir.
        self.out = Path(cfg.out_dir).resolve()
        self.variants = cfg.all_variants()
        path = Path(cfg.up_config)
        if not path.is_file():
            raise ConfigError(f"--up_config: no such file {str(path)!r}")
        self.base = merge_tables(tomllib.loads(path.read_text()), cfg.up)
        for key, phase in (("--sft_phase", cfg.sft_phase), ("--rl_phase", cfg.rl_phase)):
            if phase not in self.base.get("phases", {}):
                raise ConfigError(f"{key} {phase!r}: {cfg.up_config} has no [phases.{phase}]")
        if self.base.get("prepare") is None:
            raise ConfigError(f"--up_config {cfg.up_config}: needs a [prepare] section (the seeds set its seed)")
        self._up = UpConfig
        self.rl_steps = self.resolve(self.base, f"--up_config {cfg.up_config}").phases[cfg.rl_phase].steps
        self.eval_steps = sorted({*range(0, self.rl_steps, cfg.eval_every_steps), self.rl_steps})

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed-{seed}"

    def run_dir(self, seed: int, name: str) -> Path:
        return self.seed_dir(seed) / name

    def _seeded(self, seed: int, name: str) -> dict[str, Any]:
        # A deep copy: runs' dicts must share no table with each other or with the base.
        return merge_tables(
            copy.deepcopy(self.base),
            {
                "run_dir": str(self.run_dir(seed, name)),
                "run_id": f"abl-s{seed}-{name}".replace("_", "-"),
                "prepare": {"seed": seed},
                "learner": {"config": {"data": {"seed": seed}}},
                "dashboard": {"mode": "lines"},
                "report": False,
            },
        )

    def sft_config(self, seed: int) -> dict[str, Any]:
        d = self._seeded(seed, "sft")
        sft = dict(d["phases"][self.cfg.sft_phase])
        d["phases"] = {self.cfg.sft_phase: sft | {"eval_after": True}}
        return d

    def variant_config(self, seed: int, variant: Variant, sft_export: str) -> dict[str, Any]:
        """The RL phase alone, from the SFT export as its base model, on the SFT run's data."""
        d = self._seeded(seed, variant.name)
        data = self.run_dir(seed, "sft") / "data"
        rl = merge_tables(
            d["phases"][self.cfg.rl_phase],
            {
                "init": "base",
                "eval_before": False,
                "eval_after": True,
                "dataset_path": str(data / "train.jsonl"),
                # Keep every export: the accuracy curve is measured on them after the run.
                "learner": {"weight_sync": {"export_keep_last": self.rl_steps + 1}},
            },
        )
        d.pop("prepare")
        d["model_path"] = sft_export
        d["phases"] = {self.cfg.rl_phase: rl}
        d["eval"] = merge_tables(d.get("eval", {}), {"dataset_path": str(data / "heldout.jsonl")})
        d["reward"] = merge_tables(
            d.get("reward", {}), {"config": {"eta": variant.eta, "combination": variant.combination}}
        )
        return d

    def resolve(self, d: dict[str, Any], flag: str) -> Any:
        """The UpConfig of a dict (its validators check every child config)."""
        try:
            return self._up.model_validate(d)
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from e

    def check(self) -> dict[str, dict[str, list[Any]]]:
        """Resolve every run's config now and check the variants differ only in the reward rule."""
        placeholder = str(self.run_dir(0, "sft") / "phases" / self.cfg.sft_phase / "exports" / "LATEST")
        for seed in self.cfg.seeds:
            self.resolve(self.sft_config(seed), f"seed {seed} sft run")
        resolved = {
            v.name: self.resolve(self.variant_config(self.cfg.seeds[0], v, placeholder), f"variant {v.name}")
            for v in self.variants
        }
        return check_reward_only({n: c.model_dump(mode="json") for n, c in resolved.items()}, "planned configs")


# -- running


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


def run_ablation(cfg: AblateConfig) -> dict[str, Any]:
    """Run every seed and variant, evaluate, diff the resolved configs, write OUT/ablation.json; the summary."""
    import torch

    torch.set_num_threads(1)
    plan = Plan(cfg)
    planned_diff = plan.check()
    plan.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lock = threading.Lock()
    sft: dict[int, dict[str, Any]] = {}
    runs: dict[tuple[int, str], dict[str, Any]] = {}
    pool = ThreadPoolExecutor(max_workers=cfg.max_parallel)
    futures: list[Future[None]] = []
    failed = threading.Event()  # after a failure, queued runs return at once

    def submit(fn: Callable[..., None], *args: Any) -> None:
        def job() -> None:
            if failed.is_set():
                return
            try:
                fn(*args)
            except BaseException:
                failed.set()
                raise

        with lock:
            futures.append(pool.submit(job))

    def run_sft(seed: int) -> None:
        d = plan.sft_config(seed)
        wall = run_up(plan, d, f"seed-{seed}-sft", cfg.run_timeout_s)
        up = plan.resolve(d, "sft")
        export = sft_export(plan, seed)
        # Step 0 of every variant's curve: the post-SFT model, evaluated once, as the variants see it.
        v0 = plan.resolve(plan.variant_config(seed, plan.variants[0], str(export)), "variant")
        records = samples_at(plan, v0, export, plan.run_dir(seed, "sft") / "samples" / "step-0.jsonl")
        with lock:
            sft[seed] = {"wall_s": wall, "export": str(export), "indicators": indicators(records, cfg.hacking)}
            sft[seed]["system_eval"] = _system_eval(Path(up.run_dir))
        for v in plan.variants:
            submit(run_variant, seed, v, str(export))

    def run_variant(seed: int, v: Variant, export: str) -> None:
        d = plan.variant_config(seed, v, export)
        name = f"seed-{seed}-{v.name}"
        wall = run_up(plan, d, name, cfg.run_timeout_s)
        up = plan.resolve(d, name)
        run_dir = Path(up.run_dir)
        curve = {}
        for step, path in sorted(export_steps(plan, run_dir).items()):
            records = samples_at(plan, up, path, run_dir / "samples" / f"step-{step}.jsonl")
            curve[step] = indicators(records, cfg.hacking)
        if not cfg.keep_exports:
            _prune_exports(run_dir / "phases" / cfg.rl_phase / "exports")
        with lock:
            runs[(seed, v.name)] = {
                "wall_s": wall,
                "curve": curve,
                "system_eval": _system_eval(run_dir),
                "train": _train_tail(run_dir, cfg.rl_phase),
            }

    try:
        for seed in cfg.seeds:
            submit(run_sft, seed)
        done = 0
        while True:  # runs submit their follow-ups: wait until no future is left unfinished
            with lock:
                pending = futures[done:]
            if not pending:
                break
            for f in pending:
                f.result()
            done += len(pending)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    # The configs the runs really used (RUN_DIR/config.json), diffed per seed.
    used_diff = {}
    for seed in cfg.seeds:
        used = {v.name: _used_config(plan.run_dir(seed, v.name)) for v in plan.variants}
        used_diff[str(seed)] = check_reward_only(used, f"seed {seed} run directories")
    summary = summarize(plan, sft, runs)
    summary["config_diff"] = {"planned": planned_diff, "used": used_diff, "only_reward_rule_differs": True}
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    (plan.out / ABLATION_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _used_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json as UpConfig reads it today: a field added since an older (reused) run was made takes
    its default in every run alike, instead of showing up as a difference of that run alone."""
    from deploy.launcher.config import UpConfig

    raw = json.loads((run_dir / "config.json").read_text())
    return UpConfig.model_validate(raw).model_dump(mode="json")


def _prune_exports(exports: Path) -> None:
    from weights.exports import latest_export

    found = latest_export(exports)
    for p in exports.glob("v*"):
        if p.is_dir() and (found is None or p.resolve() != found[0]):
            shutil.rmtree(p, ignore_errors=True)


def _system_eval(run_dir: Path) -> dict[str, Any]:
    """The launcher's own (engine) evaluation after the run's last phase, from eval.jsonl."""
    from deploy.launcher.rundir import RunDir

    after = [e for e in RunDir.at(run_dir).evals() if e["when"] == "after"]
    if not after:
        return {}
    keys = ("accuracy", "rubric_hit_rate", "well_formed_rate", "response_len_mean", "num_questions")
    return {k: after[-1][k] for k in keys}


def _train_tail(run_dir: Path, phase: str) -> dict[str, float]:
    """Training-group figures over the last 10 RL steps (metrics.jsonl)."""
    from deploy.launcher.rundir import RunDir

    rows = RunDir.at(run_dir).metrics(phase)[-10:]
    keys = ("reward_mean", "outcome_mean", "raw_rubric_mean", "zeroed_fraction", "truncated_fraction")
    return {k: _mean([float(r[k]) for r in rows if k in r]) for k in keys}


# -- the summary


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def spread(values: dict[int, float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one seed) and the per-seed values."""
    xs = list(values.values())
    return {
        "mean": _mean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs) if xs else math.nan,
        "max": max(xs) if xs else math.nan,
        "per_seed": {str(s): x for s, x in values.items()},
    }


FINAL_KEYS = (
    "accuracy",
    "rubric_hit_rate",
    "well_formed_rate",
    "ill_formed_rate",
    "unfinished_rate",
    "entities_named_mean",
    "listing_rate",
    "hacking_rate",
    "rubric_without_outcome_rate",
)


def summarize(
    plan: Plan, sft: dict[int, dict[str, Any]], runs: dict[tuple[int, str], dict[str, Any]]
) -> dict[str, Any]:
    cfg = plan.cfg
    variants: dict[str, Any] = {}
    for v in plan.variants:
        # Per seed: step -> indicators, with step 0 the shared SFT model.
        per_seed = {s: {0: sft[s]["indicators"], **runs[(s, v.name)]["curve"]} for s in cfg.seeds}
        last = {s: max(c) for s, c in per_seed.items()}
        steps = [k for k in plan.eval_steps if all(k in c for c in per_seed.values())]
        curves = {}
        for key in ("accuracy", "rubric_hit_rate", "hacking_rate", "ill_formed_rate"):
            points = [spread({s: per_seed[s][k][key] for s in cfg.seeds}) for k in steps]
            curves[key] = {
                "mean": [p["mean"] for p in points],
                "std": [p["std"] for p in points],
                "per_seed": {str(s): [per_seed[s][k][key] for k in steps] for s in cfg.seeds},
            }
        entry: dict[str, Any] = {
            "eta": v.eta,
            "combination": v.combination,
            "final_step": {str(s): last[s] for s in cfg.seeds},
            "curve_steps": steps,
            "curves": curves,
        }
        for key in FINAL_KEYS:
            entry[key] = spread({s: per_seed[s][last[s]][key] for s in cfg.seeds})
        entry["final_accuracy"] = entry["accuracy"]
        # Held-out samples behind each final rate, over all seeds: the scale of its sampling noise (checks' z).
        entry["num_samples"] = int(sum(per_seed[s][last[s]].get("num_samples", 0) for s in cfg.seeds))
        # Mean accuracy over the RL curve (steps > 0): separates "learns faster" from "ends higher".
        entry["accuracy_curve_mean"] = spread(
            {s: _mean([per_seed[s][k]["accuracy"] for k in steps if k > 0]) for s in cfg.seeds}
        )
        entry["gain_over_sft"] = spread(
            {s: per_seed[s][last[s]]["accuracy"] - per_seed[s][0]["accuracy"] for s in cfg.seeds}
        )
        entry["system_eval_accuracy"] = spread(
            {s: float(runs[(s, v.name)]["system_eval"].get("accuracy", math.nan)) for s in cfg.seeds}
        )
        entry["train_last10"] = {str(s): runs[(s, v.name)]["train"] for s in cfg.seeds}
        entry["wall_s"] = {str(s): round(runs[(s, v.name)]["wall_s"], 1) for s in cfg.seeds}
        variants[v.name] = entry
    return {
        "bench": "ablation",
        "seeds": cfg.seeds,
        "rl_steps": plan.rl_steps,
        "eval_steps": plan.eval_steps,
        "held_out": "greedy per-sample evaluation of the HF exports (experiments/ablate_samples.py); system_eval_accuracy "
        "is the launcher's engine evaluation after the RL phase",
        "hacking_definition": f"wrong samples naming >= {cfg.hacking.listing_min_entities} distinct entities "
        f"(/{cfg.hacking.entity_pattern}/) in the answer, or in the whole response when it is not well-formed",
        "sft": {
            str(s): {k: sft[s][k] for k in ("wall_s", "system_eval")} | {"accuracy": sft[s]["indicators"]["accuracy"]}
            for s in cfg.seeds
        },
        "variants": variants,
        "checks": direction_checks(variants),
        "paper": PAPER,
        "ratio": _ratio(variants),
    }


def _ratio(variants: dict[str, Any]) -> float:
    """Final held-out accuracy of positive_only over outcome_only (the bench's headline ratio)."""
    if "positive_only" not in variants or "outcome_only" not in variants:
        return math.nan
    a, b = variants["positive_only"]["accuracy"]["mean"], variants["outcome_only"]["accuracy"]["mean"]
    return a / b if b > 0 else math.nan


def difference_z(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    """z of the difference of two variants' pooled final rates `key` (two-proportion test over all seeds' held-out
    samples): |z| < 2 means the difference is within the sampling noise of the evaluation alone (seed-to-seed
    variation of training comes on top of it)."""
    n1, n2 = a.get("num_samples", 0), b.get("num_samples", 0)
    if not n1 or not n2:
        return math.nan
    p1, p2 = a[key]["mean"], b[key]["mean"]
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (p1 - p2) / se if se > 0 else 0.0


def direction_checks(variants: dict[str, Any]) -> dict[str, Any]:
    """The paper's directions on this task (None when a variant is missing): positive-only >= outcome-only in
    final held-out accuracy, and rubric-on-every-sample hacks more than positive-only. Each difference comes with
    its z (`difference_z`): a direction that holds at |z| < 2 is not evidence either way."""
    out: dict[str, Any] = {}

    def compare(name: str, a: str, b: str, key: str) -> None:
        """`name`: variant a's mean final `key` minus variant b's; `name_z`: its z."""
        out[name] = variants[a][key]["mean"] - variants[b][key]["mean"]
        out[f"{name}_z"] = difference_z(variants[a], variants[b], key)

    if "positive_only" in variants and "outcome_only" in variants:
        p, o = variants["positive_only"]["accuracy"], variants["outcome_only"]["accuracy"]
        out["positive_only_ge_outcome_only"] = p["mean"] >= o["mean"]
        compare("positive_only_minus_outcome_only", "positive_only", "outcome_only", "accuracy")
        out["seeds_positive_only_ge_outcome_only"] = sum(p["per_seed"][s] >= o["per_seed"][s] for s in p["per_seed"])
        out["paper_positive_only_minus_outcome_only"] = PAPER["positive_only"] - PAPER["outcome_only"]
    else:
        out["positive_only_ge_outcome_only"] = None
    if "both" in variants and "positive_only" in variants:
        b, p = variants["both"]["hacking_rate"], variants["positive_only"]["hacking_rate"]
        out["both_hacks_more_than_positive_only"] = b["mean"] > p["mean"]
        for key, name in (
            ("hacking_rate", "hacking"),
            ("rubric_without_outcome_rate", "rubric_without_outcome"),
            ("ill_formed_rate", "ill_formed"),
            ("accuracy", "accuracy"),
        ):
            compare(f"both_minus_positive_only_{name}", "both", "positive_only", key)
        out["paper_both_minus_positive_only"] = PAPER["both"] - PAPER["positive_only"]
    else:
        out["both_hacks_more_than_positive_only"] = None
    return out


def load(path: str | None, overrides: list[str]) -> AblateConfig:
    return load_config(AblateConfig, path, overrides)
