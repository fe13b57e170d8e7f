"""`longtrace bench cluster`'s config (configs/bench/cluster.toml): the shape of the namespace cluster, the delays and
faults each run gets, and where the services' configs come from (an UpConfig's, so the sizes are `longtrace up`'s).
experiments/cluster_scenario.py runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.config import BaseConfig, load_config

Fault = Literal["partition_rollout", "partition_learner", "partition_learner_long", "redis_stall"]
ALL_FAULTS: tuple[Fault, ...] = ("partition_rollout", "partition_learner", "partition_learner_long", "redis_stall")
DEFAULT_FAULTS: tuple[Fault, ...] = ("partition_rollout",)
REPO = Path(__file__).resolve().parents[1]


class ClusterConfig(BaseConfig):
    up_config: str = "configs/debug/live_eval.toml"
    """An UpConfig TOML (relative to the repository): its [prepare] makes the tiny model and data, its service
    sections give the learner, engine, rollout and reward configs the scripts start with."""
    phase: str = "rl"
    """The RL phase of `up_config` whose learner config is used."""
    run_dir: str = "runs/bench-cluster"
    """Each run writes under `run_dir/<delay>ms` (the nodes' shared filesystem: model, data, configs, RUN_DIR)."""
    learner_nodes: int = Field(4, ge=1, le=16)
    """Learner "machines" (NNODES; one rank each: NPROC_PER_NODE=1, gloo)."""
    steps: int = Field(6, ge=2)
    """Learner steps of each run."""
    delays_ms: list[float] = Field(default_factory=lambda: [0.0, 50.0])
    """One run per delay, on every node's link (both ways)."""
    jitter_ms: float = Field(20.0, ge=0)
    """Jitter of the runs with a delay (uniform, +-)."""
    loss_pct: float = Field(1.0, ge=0, le=50)
    """Frame loss of the runs with a delay, on every link, each way."""
    shaper: Literal["auto", "netem", "userspace"] = "auto"
    """How delay and loss are applied (deploy/cluster/netns.py): the kernel's netem, the userspace relay (for kernels
    without sch_netem), or auto: netem where the kernel has it."""
    faults: list[Fault] = Field(default_factory=lambda: list(DEFAULT_FAULTS))
    """Faults of the last run (the others run clean): the rollout node (Redis, reward, engine, rollout worker)
    or learner node 1 cut off for `partition_s`; `partition_learner_long` cuts learner node 1 off for longer than
    the learners' collective timeout (their model.dist_timeout_s, which follows weight_sync_timeout_s, plus
    `partition_s`): every rank fails and the job ends on every node; once the node is back the learners are started
    again and resume from the checkpoint (one per step); `redis_stall` freezes Redis for `redis_stall_s`."""
    partition_s: float = Field(5.0, gt=0)
    redis_stall_s: float = Field(15.0, gt=0)
    """`redis_stall`: redis-server frozen (SIGSTOP, then SIGCONT) this long, so Redis answers no client on any node,
    the services beside it on the rollout node included (a partition of that node cuts off only the learners)."""
    fault_after_step: int = Field(2, ge=1)
    """A fault starts once metrics.jsonl has this many steps (each next fault `fault_after_step` steps later)."""
    weight_sync_timeout_s: float = Field(30.0, gt=0)
    """The learner's weight_sync.init_timeout_s and broadcast_timeout_s (model.dist_timeout_s follows): how long a
    push waits for an engine cut off, or for one that cannot reach the group's address."""
    startup_timeout_s: float = Field(120.0, gt=0)
    """Redis up and the engine registered within this."""
    run_timeout_s: float = Field(300.0, gt=0)
    """The learners must all exit within this after they start."""

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if not self.delays_ms:
            raise ValueError("--delays_ms: give at least one delay (0 for none)")
        if any(d < 0 for d in self.delays_ms):
            raise ValueError(f"--delays_ms {self.delays_ms}: a delay is >= 0")
        if len(set(self.faults)) != len(self.faults):
            raise ValueError(f"--faults {self.faults}: a fault is listed twice")
        if {"partition_learner", "partition_learner_long"} & set(self.faults) and self.learner_nodes < 2:
            raise ValueError("--faults partition_learner* needs --learner_nodes >= 2 (node 0 hosts the rendezvous)")
        if self.fault_after_step * max(1, len(self.faults)) >= self.steps:
            raise ValueError(f"--steps {self.steps}: the faults start at steps up to "
                             f"{self.fault_after_step * len(self.faults)}; leave steps after them")  # fmt: skip
        if not (REPO / self.up_config).is_file() and not Path(self.up_config).is_file():
            raise ValueError(f"--up_config {self.up_config!r}: no such file")
        return self

    def up_path(self) -> Path:
        p = Path(self.up_config)
        return p if p.is_absolute() or p.is_file() else REPO / p


def load_cluster_config(path: str | Path, overrides: list[str]) -> ClusterConfig:
    return load_config(ClusterConfig, path, overrides)
