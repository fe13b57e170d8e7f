"""The weight-sync interface the training loop calls, its report, and the no-op backend.

`maybe_push(step, model)` is called on every learner rank after every optimizer step and is a collective
over the learner's ranks when it pushes (TP ranks take part in gathering full tensors). It returns a
`PushReport` when this step was a push step (on every rank; only the coordinator's has the engine
details), else None. The policy version is the step whose weights reached the engines.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any

from broker.base import PolicyVersion

logger = logging.getLogger(__name__)


@dataclass
class PushReport:
    """What one push did. `version` is the policy version after the push (unchanged when nothing got it)."""

    version: int
    ok: bool = True
    bytes: int = 0
    buckets: int = 0
    transfer_s: float = 0.0
    pause_to_continue_s: float = 0.0
    total_s: float = 0.0
    num_engines: int = 0
    updated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Engine URL -> why its update failed (dead, timeout, refused)."""
    group_rebuilds: int = 0
    attempts: int = 0
    exported_to: str = ""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.transfer_s / 1e9 if self.transfer_s > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat floats for the metrics logger."""
        return {
            "weight_sync/version": float(self.version),
            "weight_sync/ok": float(self.ok),
            "weight_sync/bytes": float(self.bytes),
            "weight_sync/buckets": float(self.buckets),
            "weight_sync/transfer_s": self.transfer_s,
            "weight_sync/gb_per_s": self.gb_per_s,
            "weight_sync/pause_to_continue_s": self.pause_to_continue_s,
            "weight_sync/total_s": self.total_s,
            "weight_sync/num_engines": float(self.num_engines),
            "weight_sync/num_failed": float(len(self.failed)),
            "weight_sync/group_rebuilds": float(self.group_rebuilds),
        }


class WeightSyncError(RuntimeError):
    """Weights could not reach any engine for `max_consecutive_failures` pushes in a row."""


class WeightSync(abc.ABC):
    every_k_steps: int = 1

    def should_push(self, step: int) -> bool:
        return step % self.every_k_steps == 0

    def maybe_push(self, step: int, model: Any) -> PushReport | None:
        """Push `model`'s weights as version `step` when the cadence says so (a collective on every rank)."""
        if not self.should_push(step):
            return None
        return self.push(step, model)

    @abc.abstractmethod
    def push(self, version: int, model: Any) -> PushReport:
        """Push now, as policy version `version`."""

    def close(self) -> None:
        """Release process groups, HTTP clients and threads (idempotent)."""
        return None


class NoSync(WeightSync):
    """Pushes nothing: the policy version becomes the step, in the broker key (coordinator only) and the report,
    so admission control and staleness drops behave as if every step's weights had reached the engines."""

    def __init__(self, policy_version: PolicyVersion | None = None, initial_version: int = 0) -> None:
        self._key = policy_version
        if self._key is not None:
            self._key.set(initial_version)

    def push(self, version: int, model: Any) -> PushReport:
        if self._key is not None:
            self._key.set(version)
        return PushReport(version=version)
