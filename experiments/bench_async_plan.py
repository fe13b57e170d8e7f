"""The async bench's config and plan: BenchAsyncConfig (the judge stub, the warm start, the shared `up` keys and
the checks of both runs' configs at load) and RunPlan, the UpConfig of each `longtrace up` run (sync: warm start
and RL at max_staleness 0; async: RL at `async_max_staleness` from the same weights). experiments/bench_async.py
runs the plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from common.config import BaseConfig, get_path, has_path, merge_tables

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "bench" / "async.toml"
_PLACEHOLDER_URL = "http://127.0.0.1:1/v1"

# UpConfig keys of `up` that the bench sets itself (each run's directory, Redis, phases, judge URL, staleness).
BENCH_KEYS = (
    "run_dir",
    "run_id",
    "model_path",
    "redis",
    "phases",
    "dashboard",
    "report",
    "reward.serve",
    "reward.config.judge.base_url",
    "learner.config.data.max_staleness",
)


class JudgeSection(BaseConfig):
    delay_s: float = Field(1.0, ge=0)
    """Seconds each judge call takes (the remote LLM's latency; asyncio sleep, so I/O, no CPU)."""
    concurrency: int = Field(8, ge=1)
    """Judge calls served at once (the remote LLM's capacity); the others queue."""


class WarmStartSection(BaseConfig):
    steps: int = Field(60, ge=1)
    """SFT steps before the RL runs, so that answers are well formed and reach the judge."""
    learner: dict[str, Any] = {}
    """TrainConfig keys of the SFT phase, over `up.learner.config` (e.g. data.groups_per_step, optim.lr)."""


class BenchAsyncConfig(BaseConfig):
    run_dir: str = "runs/bench-async"
    """Parent directory; each bench writes `<run_dir>/<timestamp>/{sync,async}` (two `longtrace up` run dirs)."""
    steps: int = Field(12, ge=3)
    """RL steps of each run."""
    warmup_steps: int = Field(2, ge=1)
    """First steps left out of the medians (start-up, and the async pipeline filling)."""
    async_max_staleness: int = Field(2, ge=1)
    """max_staleness of the async run (the sync run has 0)."""
    judge: JudgeSection = Field(default_factory=JudgeSection)
    """The stand-in remote judge."""
    warm_start: WarmStartSection = Field(default_factory=WarmStartSection)
    """SFT in the sync run's `longtrace up` before its RL phase (skipped when model_path is set)."""
    model_path: str = ""
    """A warm HF model directory (e.g. a demo run's exports/v300); empty: train one with [warm_start]."""
    dataset_path: str = ""
    """The RL prompts (LongTraceRL JSONL), required with model_path; empty: the data [up.prepare] writes."""
    poll_s: float = Field(0.25, gt=0)
    """Period of the reads of the `scored` stream (entries stay there until the learner's final checkpoint)."""
    run_timeout_s: float = Field(900.0, gt=0)
    """A `longtrace up` run that takes longer is interrupted and the bench fails."""
    up: dict[str, Any] = {}
    """UpConfig keys shared by both runs (prepare, reward, engines, rollout, learner); not those in BENCH_KEYS."""

    @model_validator(mode="after")
    def _check(self) -> BenchAsyncConfig:
        if self.warmup_steps >= self.steps - 1:
            raise ValueError(f"--warmup_steps {self.warmup_steps} leaves no measured step of --steps {self.steps}")
        for key in BENCH_KEYS:
            if has_path(self.up, key):
                raise ValueError(f"--up.{key} is set by the bench (experiments/bench_async.py); remove it")
        judge = get_path(self.up, "reward.config.judge.kind", "rule")
        if judge != "llm":
            raise ValueError(f"--up.reward.config.judge.kind must be llm (the stub judge), got {judge!r}")
        if bool(self.model_path) != bool(self.dataset_path):
            raise ValueError("--model_path and --dataset_path go together (a warm model and its prompts)")
        if not self.model_path and "prepare" not in self.up:
            raise ValueError("--up.prepare is required unless --model_path and --dataset_path are given")
        # Both runs' UpConfigs are built here with placeholders, so a bad key fails at load time.
        plan = RunPlan(self, Path("bench"), _PLACEHOLDER_URL)
        for mode in ("sync", "async"):
            plan.up_config(mode, redis_port=0, warm_model=self.model_path or "warm-model")
        return self


class BenchError(RuntimeError):
    """A run failed or produced too little to measure (the message says which and where its log is)."""


class RunPlan:
    """The UpConfig of each run: the shared `up` keys plus what the bench sets."""

    def __init__(self, cfg: BenchAsyncConfig, root: Path, judge_url: str) -> None:
        self.cfg = cfg
        self.root = root
        self.judge_url = judge_url

    def run_dir(self, mode: str) -> Path:
        return self.root / mode

    def warm_model(self) -> str:
        """The model both RL phases start from (the warm start's last export when the bench trains it)."""
        if self.cfg.model_path:
            return self.cfg.model_path
        from weights.exports import latest_export

        found = latest_export(self.run_dir("sync") / "phases" / "sft" / "exports")
        if found is None:
            raise BenchError(f"the warm start left no export in {self.run_dir('sync')}/phases/sft/exports")
        return str(found[0])

    def up_config(self, mode: str, redis_port: int, warm_model: str) -> Any:
        from deploy.launcher.config import UpConfig

        cfg = self.cfg
        staleness = 0 if mode == "sync" else cfg.async_max_staleness
        rl: dict[str, Any] = {
            "kind": "rl",
            "steps": cfg.steps,
            "eval_after": False,
            # One checkpoint, after the last step: scored entries stay in the stream (and in reach of the
            # observer) until then, and no step but the last pays for a checkpoint.
            "learner": {"data": {"max_staleness": staleness}, "checkpoint": {"interval_steps": cfg.steps}},
        }
        up = dict(cfg.up)
        phases: dict[str, Any] = {}
        if mode == "sync" and not cfg.model_path:
            sft_learner = {"checkpoint": {"interval_steps": cfg.warm_start.steps}}
            phases["sft"] = {
                "kind": "sft",
                "steps": cfg.warm_start.steps,
                "init": "base",
                "eval_after": False,
                "learner": merge_tables(sft_learner, cfg.warm_start.learner),
            }
            rl["init"] = "previous"
        else:
            up.pop("prepare", None)
            up["model_path"] = warm_model
            rl["init"] = "base"
            rl["dataset_path"] = cfg.dataset_path or str(self.run_dir("sync") / "data" / "train.jsonl")
        phases["rl"] = rl
        data = merge_tables(
            up,
            {
                "run_dir": str(self.run_dir(mode)),
                "run_id": f"bench-{mode}",
                "redis": {"port": redis_port},
                "reward": {"serve": False, "config": {"judge": {"base_url": self.judge_url}}},
                "phases": phases,
                "dashboard": {"mode": "lines"},
                "report": False,
            },
        )
        try:
            return UpConfig.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                (f"{'.'.join(str(x) for x in err['loc'])}: " if err["loc"] else "")
                + str(err["msg"]).removeprefix("Value error, ")
                for err in e.errors(include_url=False)
            )
            raise ValueError(f"the {mode} run's UpConfig (flags below are under --up.): {problems}") from None
