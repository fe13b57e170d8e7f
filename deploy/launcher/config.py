"""`UpConfig`: the composite config of `longtrace up`, one TOML for the whole system on one machine.

Each service keeps its own typed config (RewardConfig, EngineConfig, RolloutConfig, TrainConfig); its section
holds one (`[reward.config]`, `[engines.config]`, `[rollout.config]`, `[learner.config]`, with
`[phases.<name>.learner]` tables merged over the learner's per phase) next to what only the launcher knows: how
many replicas, which phases, where the run directory is (deploy/launcher/sections.py). Loading an UpConfig
builds every child config once, so a typo or a bad value in any section fails at load time with the full flag
(`--learner.config.optim.lr`, `--phases.rl.learner.optim.lr`).

Values shared by several services live in one place and the launcher passes them to the children: the Redis
URL (the embedded server's port is only known at start), the run id (one namespace per phase:
`<run_id>-<phase>`), the model directory (the base model, then each phase's last export), ports, consumer
names and the learner's run directory. A section that sets one of them is an error: the validators check,
they never rewrite a section. They also check invariants between services: the engines sample at the
temperature the learner assumes, the learner's parallel layout fits its ranks, and a phase that starts from the
previous phase's weights has an earlier phase that exports them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from common.config import BaseConfig, get_path, has_path, merge_tables
from deploy.launcher.rundir import RunDir
from deploy.launcher.sections import (
    LAUNCHER_KEYS,
    DashboardSection,
    EnginesSection,
    EvalSection,
    LearnerSection,
    PhaseConfig,
    PrepareSection,
    RedisSection,
    RewardSection,
    RolloutSection,
    build_config,
)
from learner.tracking import TENSORBOARD_SUBDIR
from learner.train_config import TrainConfig
from reward_service.config import RewardConfig
from rollout_server.engine.config import EngineConfig
from rollout_server.worker.config import RolloutConfig

LAUNCHER_TRACKING_BACKENDS = ["jsonl", "tensorboard"]
"""The learners' `tracking.backends` unless a section sets them: TensorBoard event files in each phase's run dir."""
PLACEHOLDER_REDIS_URL = "redis://127.0.0.1:6379/0"
"""Stands in for the Redis URL when child configs are checked before Redis runs."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    d = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value
    return out


class UpConfig(BaseConfig):
    run_dir: str = "runs/up"
    """Run directory: resolved config, logs/, configs/, data/, model/, phases/<name>/ (metrics), eval.jsonl."""
    run_id: str = "up"
    """Prefix of the broker namespaces (one per phase: `<run_id>-<phase>`)."""
    model_path: str = ""
    """Base HF model directory; empty: the model written by [prepare]."""
    redis: RedisSection = Field(default_factory=RedisSection)
    """Redis: embedded (default) or a given URL."""
    prepare: PrepareSection | None = None
    """Set-up of data and model before anything starts (skipped when its outputs exist)."""
    reward: RewardSection = Field(default_factory=RewardSection)
    """The reward service."""
    engines: EnginesSection = Field(default_factory=EnginesSection)
    """The built-in engines."""
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    """The rollout workers."""
    learner: LearnerSection = Field(default_factory=LearnerSection)
    """The learner under torchrun."""
    phases: dict[str, PhaseConfig] = Field(min_length=1)
    """Phases by name, run one after another in file order (`[phases.sft]` then `[phases.rl]`); a table keyed
    by name rather than an array, so `--phases.rl.steps 300` overrides one of them."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Held-out evaluation between phases (and during RL phases: `every_steps`)."""
    dashboard: DashboardSection = Field(default_factory=DashboardSection)
    """The live terminal dashboard."""
    startup_timeout_s: float = Field(300.0, gt=0)
    """A service that is not ready this long after its start fails the run."""
    shutdown_timeout_s: float = Field(60.0, gt=0)
    """Ordered shutdown deadline: whatever still runs after it is killed (SIGKILL)."""
    phase_timeout_s: float = Field(0.0, ge=0)
    """A phase whose learner runs longer than this fails the run; 0: no limit."""
    report: bool = True
    """Write RUN_DIR/report (plots and report.md) when the run succeeds."""

    @model_validator(mode="after")
    def _check(self) -> UpConfig:
        if not _NAME.match(self.run_id.replace("-", "_")):
            raise ValueError(f"--run_id {self.run_id!r}: use lower-case letters, digits, - and _")
        for name in self.phases:
            if not _NAME.match(name):
                raise ValueError(f"--phases.{name}: name a phase with lower-case letters, digits and _")
        if not self.model_path and self.prepare is None:
            raise ValueError("--model_path is required unless a [prepare] section writes the model")
        for name, phase in self.phases.items():
            if not phase.dataset_path and self.prepare is None:
                raise ValueError(f"--phases.{name}.dataset_path is required unless a [prepare] section writes the data")
        wants_eval = any(p.eval_before or p.eval_after for p in self.phases.values()) or bool(
            self.eval.every_steps and any(p.kind == "rl" for p in self.phases.values())
        )
        if wants_eval and not self.eval.dataset_path and self.prepare is None:
            raise ValueError("--eval.dataset_path is required for evaluation unless [prepare] writes heldout.jsonl")
        if wants_eval and not self.reward.serve:
            raise ValueError("evaluation scores through the reward API: set --reward.serve true or eval_* = false")
        # The service sections checked theirs when they were read (deploy/launcher/sections.py).
        for name, phase in self.phases.items():
            for key in LAUNCHER_KEYS["learner"]:
                if has_path(phase.learner, key):
                    raise ValueError(
                        f"--phases.{name}.learner.{key} is set by the launcher (see deploy/launcher/sections.py); remove it"
                    )
        # Build every child config once, with placeholders for what only exists at run time.
        first = next(iter(self.phases))
        reward = self.reward_config(PLACEHOLDER_REDIS_URL, first, 0)
        engine = self.engine_config(PLACEHOLDER_REDIS_URL, first, 0, 0, "model")
        rollout = self.rollout_config(PLACEHOLDER_REDIS_URL, first, 0)
        assert engine.broker is not None  # the launcher always gives engines its broker (the registry)
        brokers = {"reward.config": reward.broker, "engines.config": engine.broker, "rollout.config": rollout.broker}
        names = list(self.phases)
        for i, name in enumerate(names):
            train = self.train_config(PLACEHOLDER_REDIS_URL, name, "model", "data.jsonl", "phase")
            self._check_phase(name, names[i - 1] if i else None, train, reward, engine, rollout)
            brokers["learner.config" if not self.phases[name].learner else f"phases.{name}.learner"] = train.broker
        if self.redis.child_url_and_password()[1] is not None:
            for flag, broker in brokers.items():
                # The launcher hands the URL's password to each service in the variable its broker reads.
                if broker.redis_password_file or not broker.redis_password_env:
                    raise ValueError(
                        f"--redis.url has a password, which the services get in the environment variable named "
                        f"by --{flag}.broker.redis_password_env: unset --{flag}.broker.redis_password_file and "
                        f"leave redis_password_env set (or take the password out of --redis.url)"
                    )
        return self

    def _check_phase(
        self,
        name: str,
        prev: str | None,
        train: TrainConfig,
        reward: RewardConfig,
        engine: EngineConfig,
        rollout: RolloutConfig,
    ) -> None:
        phase = self.phases[name]
        flag = f"phases.{name}"
        m = train.model
        ranks_per_replica = m.tp_size * m.pp_size * m.cp_size
        if self.learner.nproc_per_node % ranks_per_replica:
            raise ValueError(
                f"--learner.nproc_per_node {self.learner.nproc_per_node} is not a multiple of tp*pp*cp = "
                f"{ranks_per_replica} (phase {name})"
            )
        if phase.init == "previous" and prev is not None:
            prev_train = self.train_config(PLACEHOLDER_REDIS_URL, prev, "model", "data.jsonl", "phase")
            if prev_train.weight_sync.type == "none":
                raise ValueError(
                    f"--{flag}.init previous: phase {prev!r} exports no weights (weight_sync type none); "
                    f"set --phases.{prev}.learner.weight_sync.type, or --{flag}.init base"
                )
        if phase.eval_after and train.weight_sync.type == "none":
            raise ValueError(
                f"--{flag}.eval_after: without weight sync the engines never hold the trained weights; "
                "set a weight_sync type or eval_after = false"
            )
        if phase.kind != "rl":
            return
        if self.eval.every_steps and train.weight_sync.type == "none":
            raise ValueError(
                f"--eval.every_steps: without weight sync the engines of phase {name} never hold the trained "
                "weights; set a weight_sync type or --eval.every_steps 0"
            )
        # The trainer recomputes log-probs at its own temperature; engines must sample at the same one.
        for key in ("temperature", "top_p"):
            want, got = getattr(train.data, key), getattr(rollout.sampling, key)
            if want != got:
                raise ValueError(
                    f"--{flag}.learner.data.{key} / --learner.config.data.{key} ({want}) differs from "
                    f"--rollout.config.sampling.{key} ({got}): the engines must sample as the learner assumes"
                )
        if train.model.routing_replay != rollout.sampling.routing_replay:
            raise ValueError(
                f"--learner.config.model.routing_replay ({train.model.routing_replay}) differs from "
                f"--rollout.config.sampling.routing_replay ({rollout.sampling.routing_replay}): the learner replays "
                "the routing that the rollout workers ask the engines for (set both)"
            )
        if engine.context_length and train.data.max_total_tokens > engine.context_length:
            raise ValueError(
                f"--learner.config.data.max_total_tokens {train.data.max_total_tokens} exceeds "
                f"--engines.config.context_length {engine.context_length} (phase {name})"
            )

    # -- the child configs (also used by the launcher to write each child's TOML)

    def phase_run_id(self, phase_name: str) -> str:
        return f"{self.run_id}-{phase_name}"

    def reward_config(self, redis_url: str, phase_name: str, port: int, consumer: str = "") -> RewardConfig:
        data = merge_tables(
            self.reward.given(),
            {
                "host": "127.0.0.1",
                "port": port,
                "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(phase_name)},
                "worker": {"consumer": consumer},
            },
        )
        return build_config(RewardConfig, data, "reward.config")

    def engine_config(self, redis_url: str, phase_name: str, index: int, port: int, model_path: str) -> EngineConfig:
        data = merge_tables(
            self.engines.given(),
            {
                "model_path": model_path,
                "host": "127.0.0.1",
                "port": port,
                "engine_id": f"engine-{index}",
                "num_threads": self.engines.num_threads,
                "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(phase_name)},
            },
        )
        return build_config(EngineConfig, data, "engines.config")

    def rollout_config(self, redis_url: str, phase_name: str, index: int) -> RolloutConfig:
        data = merge_tables(
            self.rollout.given(),
            {
                "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(phase_name)},
                "worker_id": f"rollout-{index}",
            },
        )
        return build_config(RolloutConfig, data, "rollout.config")

    def train_config(
        self, redis_url: str, name: str, model_path: str, dataset_path: str, phase_dir: str
    ) -> TrainConfig:
        phase = self.phases[name]
        merged = merge_tables(self.learner.given(), phase.learner)
        launcher: dict[str, Any] = {
            "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(name)},
            "model": {"hf_path": model_path},
            "run_dir": phase_dir,
            "max_steps": phase.steps,
            "loss": {"mode": "sft" if phase.kind == "sft" else "grpo"},
            # sft: demonstrations arrive on `scored` from the launcher's publisher; the learner admits no tasks.
            "data": {"dataset_path": dataset_path if phase.kind == "rl" else ""},
        }
        if get_path(merged, "weight_sync.type", "none") != "none":
            launcher = merge_tables(launcher, _nest("weight_sync.export_dir", f"{phase_dir}/exports"))
        # Defaults of the launcher's learners, under what the sections set: TensorBoard on (<phase_dir>/tensorboard).
        tracking = {"backends": list(LAUNCHER_TRACKING_BACKENDS), "run_name": self.phase_run_id(name)}
        merged = merge_tables({"tracking": tracking}, merged)
        flag = "learner.config" if not phase.learner else f"phases.{name}.learner"
        return build_config(TrainConfig, merge_tables(merged, launcher), flag)

    def tensorboard_dirs(self) -> dict[str, Path]:
        """Phase -> the TensorBoard log directory of its learner, for the phases whose learner writes one."""
        run = RunDir.at(self.run_dir)
        out = {}
        for name, phase in self.phases.items():
            merged = merge_tables(self.learner.given(), phase.learner)
            if "tensorboard" in get_path(merged, "tracking.backends", LAUNCHER_TRACKING_BACKENDS):
                given = get_path(merged, "tracking.tensorboard_dir", "")
                out[name] = Path(given) if given else run.phase_dir(name) / TENSORBOARD_SUBDIR
        return out

    # -- paths

    @property
    def data_dir(self) -> Path:
        return Path(self.run_dir) / "data"

    def base_model_path(self) -> str:
        return self.model_path or str(Path(self.run_dir) / "model")

    def phase_dataset_path(self, phase: PhaseConfig) -> str:
        if phase.dataset_path:
            return phase.dataset_path
        return str(self.data_dir / ("sft.jsonl" if phase.kind == "sft" else "train.jsonl"))

    def eval_dataset_path(self) -> str:
        return self.eval.dataset_path or str(self.data_dir / f"{self.eval.split}.jsonl")
