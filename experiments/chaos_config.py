"""The chaos bench's config: which scenarios (each its own `longtrace up` run of the base `[up]`, with the overrides
experiments/chaos_scenarios.py gives it), the kills of the `kills` scenario and their order, the sizes of the other
scenarios, and the checks that reject a plan that cannot work before a run starts. experiments/chaos.py runs the
bench (its docstring describes each scenario and the accounting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from broker.embedded import AppendFsync
from common.config import BaseConfig, load_config
from deploy.launcher.config import UpConfig

Fault = Literal["reward_worker", "rollout_worker", "engine", "learner", "redis"]
ALL_FAULTS: tuple[Fault, ...] = ("reward_worker", "rollout_worker", "engine", "learner", "redis")
Scenario = Literal[
    "kills", "judge_outage", "long_generations", "oversized_output", "reject_task", "learner_crash_loop", "regex_bomb"
]
ALL_SCENARIOS: tuple[Scenario, ...] = (
    "kills", "judge_outage", "long_generations", "oversized_output", "reject_task", "learner_crash_loop", "regex_bomb"
)  # fmt: skip


class ChaosFailed(RuntimeError):
    """A fault was not recovered from in time, or could not be injected."""


class ChaosConfig(BaseConfig):
    scenarios: list[Scenario] = Field(default_factory=lambda: list(ALL_SCENARIOS))
    """Scenarios run, in this order, each in its own run under `up.run_dir/<scenario>`."""
    faults: list[Fault] = Field(default_factory=lambda: list(ALL_FAULTS))
    """The `kills` scenario: processes killed in this order, one at a time (each at most once)."""
    scenario_steps: int = Field(24, ge=4)
    """RL steps of each scenario but `kills` (which runs `up.phases.<phase>.steps`)."""
    judge_outage_s: float = Field(20.0, gt=0)
    """judge_outage: how long the judge refuses every call (longer than the reward worker's retries)."""
    crash_loop_restarts: int = Field(5, ge=1)
    """learner_crash_loop: learner kills inside one checkpoint interval."""
    regex_bomb_mb: float = Field(1.0, gt=0)
    """regex_bomb: size of the response of repeated tags posted to the reward API's /evaluate."""
    phase: str = ""
    """The phase the faults hit; empty: the last phase of `up` (it must be an RL phase)."""
    warmup_steps: int = Field(1, ge=1)
    """Learner steps before the first fault (engines, workers and the learner are all warm)."""
    steps_between_faults: int = Field(1, ge=1)
    """Learner steps after a recovery before the next fault."""
    recovery_timeout_s: float = Field(300.0, gt=0)
    """A fault the system has not recovered from this long after the kill fails the bench."""
    appendfsync: AppendFsync = "always"
    """AOF fsync policy of the embedded Redis (the run's `up.redis.appendfsync`, given at its start). everysec
    loses up to a second of acknowledged writes on a crash (e.g. tasks the learner counts as admitted)."""
    up: UpConfig
    """The system under test: an UpConfig (the same keys as `longtrace up`), as `[up]`, `[up.learner]`, ..."""

    @model_validator(mode="after")
    def _check(self) -> ChaosConfig:
        if len(set(self.scenarios)) != len(self.scenarios) or not self.scenarios:
            raise ValueError(f"--scenarios {self.scenarios}: name each of {', '.join(ALL_SCENARIOS)} at most once")
        if len(set(self.faults)) != len(self.faults):
            raise ValueError(f"--faults {self.faults}: a fault is listed twice")
        if not self.faults:
            raise ValueError("--faults: name at least one of " + ", ".join(ALL_FAULTS))
        phase = self.target_phase
        if phase not in self.up.phases:
            raise ValueError(f"--phase {phase!r}: no such phase in up.phases ({', '.join(self.up.phases)})")
        p = self.up.phases[phase]
        if p.kind != "rl":
            raise ValueError(f"--phase {phase!r} is an {p.kind} phase: the faults need the RL loop")
        if p.eval_after or p.eval_before:
            raise ValueError(f"--up.phases.{phase}.eval_before/eval_after: evaluation talks to the engines by their "
                             "start URL, which a respawned engine does not keep; set both false")  # fmt: skip
        needed = self.warmup_steps + len(self.faults) * self.steps_between_faults + 1
        if "kills" in self.scenarios and p.steps < needed:
            raise ValueError(
                f"--up.phases.{phase}.steps {p.steps} < {needed} = warmup_steps + faults x steps_between_faults + 1"
            )
        if "kills" in self.scenarios and "redis" in self.faults and (self.up.redis.url or not self.up.redis.appendonly):
            raise ValueError("the redis fault needs the embedded Redis with its AOF: --up.redis.url '' and "
                             "--up.redis.appendonly true")  # fmt: skip
        redis = self.up.redis
        if "appendfsync" in redis.model_fields_set and redis.appendfsync != self.appendfsync:
            raise ValueError(f"--up.redis.appendfsync {redis.appendfsync} differs from --appendfsync "
                             f"{self.appendfsync}: set the policy once, with --appendfsync")  # fmt: skip
        return self

    def up_config(self) -> UpConfig:
        """The run under test: `up` with the embedded Redis's AOF fsync policy set to `appendfsync`."""
        redis = self.up.redis
        if redis.url or not redis.appendonly:
            return self.up
        return self.up.model_copy(update={"redis": redis.model_copy(update={"appendfsync": self.appendfsync})})

    @property
    def target_phase(self) -> str:
        return self.phase or list(self.up.phases)[-1]


def load_chaos_config(path: str | Path, overrides: list[str]) -> ChaosConfig:
    return load_config(ChaosConfig, path, overrides)
