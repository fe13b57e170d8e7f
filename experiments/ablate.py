"""`longtrace ablate CONFIG`: the demo task under reward variants, several seeds each (issue 13).

    for each seed:   longtrace up  [prepare + SFT phase]             -> OUT/seed-<s>/sft      (shared warm start)
      for each variant:  longtrace up  [RL phase from the SFT export] -> OUT/seed-<s>/<variant>
        per-sample held-out records of the SFT export and of the RL exports every `eval_every_steps` steps
    summary (OUT/ablation.json) and the report (OUT/report/: variants plot, bars, ablation.md)

This module owns the ablation's config, the plan (every run's UpConfig, checked before any run starts) and the
order of the runs; experiments/ablate_runs.py runs one `longtrace up` and reads its run directory,
experiments/ablate_summary.py makes the summary and its checks, experiments/ablate_report.py the report.

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
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from common.config import BaseConfig, ConfigError, load_config, merge_tables
from common.progress import bar
from experiments.ablate_runs import (
    export_steps,
    prune_exports,
    run_up,
    samples_at,
    sft_export,
    system_eval,
    train_tail,
    used_config,
)
from experiments.ablate_samples import HackingConfig, indicators
from experiments.ablate_summary import summarize

ABLATION_FILE = "ablation.json"
REWARD_RULE_KEYS = frozenset({"reward.config.eta", "reward.config.combination"})
BOOKKEEPING_KEYS = frozenset({"run_dir", "run_id"})
"""Keys that name where a run lives; they differ between any two runs and change nothing they compute."""
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
    seeds: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
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
        # every_steps 0: the ablation measures its curve on the kept exports after the run, not on live engines
        d["eval"] = merge_tables(d.get("eval", {}), {"dataset_path": str(data / "heldout.jsonl"), "every_steps": 0})
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
    runs_total = len(cfg.seeds) * (1 + len(plan.variants))
    runs_bar = bar(runs_total, "ablation runs", "run")  # common.progress: stderr, a TTY only

    def submit(fn: Callable[..., None], *args: Any) -> None:
        def job() -> None:
            if failed.is_set():
                return
            try:
                fn(*args)
                runs_bar.update()
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
            sft[seed]["system_eval"] = system_eval(Path(up.run_dir))
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
            prune_exports(run_dir / "phases" / cfg.rl_phase / "exports")
        with lock:
            runs[(seed, v.name)] = {
                "wall_s": wall,
                "curve": curve,
                "system_eval": system_eval(run_dir),
                "train": train_tail(run_dir, cfg.rl_phase),
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
        runs_bar.close()
    # The configs the runs really used (RUN_DIR/config.json), diffed per seed.
    used_diff = {}
    for seed in cfg.seeds:
        used = {v.name: used_config(plan.run_dir(seed, v.name)) for v in plan.variants}
        used_diff[str(seed)] = check_reward_only(used, f"seed {seed} run directories")
    summary = summarize(plan, sft, runs)
    summary["config_diff"] = {"planned": planned_diff, "used": used_diff, "only_reward_rule_differs": True}
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    (plan.out / ABLATION_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load(path: str | None, overrides: list[str]) -> AblateConfig:
    return load_config(AblateConfig, path, overrides)
