"""The weight-sync interface the training loop calls: one push as a template method, its report, the no-op backend.

`maybe_push(model)` is called on every learner rank after every optimizer step (once `LearnerState.step` counts
it) and pushes on every `every_k_steps`-th step; `push(model)` pushes now. A push is a collective over the
learner's ranks (TP ranks take part in gathering full tensors). It owns the policy version; backends only move
weights:

 1. the new policy version is `LearnerState.step`: the weights of that many optimizer steps;
 2. the backend's `_transfer` moves the weights (every rank; the coordinator, global rank 0, talks to the
    engines and fills in the `Transfer`);
 3. the coordinator's `Transfer` is shared with every rank, so every rank decides alike;
 4. one rule for every backend: the push succeeded when some engine took the new weights, or there was no
    engine to take them (they wait in the export, if any, for late engines). Then, and only then,
    `LearnerState.policy_version` (the learner's only copy) becomes the new version on every rank and the
    coordinator publishes it to the broker's policy-version key (which it also publishes at start, so a
    restarted learner never leaves a stale key behind). A failed push leaves the version unchanged everywhere;
 5. `max_consecutive_failures` failed pushes in a row raise WeightSyncError on every rank;
 6. the `PushReport` is built from the outcome (every rank; the engine details are the coordinator's).
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from broker.base import Broker
from learner.state import LearnerState

if TYPE_CHECKING:  # sources imports torch
    from learner.weight_sync.sources import WeightSource

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Transfer:
    """What a backend's transfer did, as the coordinator saw it (the base shares it with every rank)."""

    num_engines: int = 0
    """Engines the push addressed (reachable at its start)."""
    updated: list[str] = field(default_factory=list)
    """Engines that serve the new weights under the new version."""
    failed: dict[str, str] = field(default_factory=dict)
    """Engine URL -> why its update failed (dead, timeout, refused)."""
    bytes: int = 0
    buckets: int = 0
    transfer_s: float = 0.0
    pause_to_continue_s: float = 0.0
    group_rebuilds: int = 0
    attempts: int = 0
    exported_to: str = ""

    @property
    def succeeded(self) -> bool:
        """The one rule of a successful push: some engine took the weights, or there was none to take them."""
        return bool(self.updated) or self.num_engines == 0


@dataclass(kw_only=True)
class PushReport(Transfer):
    """What one push did, built after it: `policy_version` is LearnerState's after the push (the pushed version
    when `ok`, else the previous one)."""

    policy_version: int
    ok: bool = True
    total_s: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.transfer_s / 1e9 if self.transfer_s > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat floats for the metrics logger (metrics.jsonl keys: deploy/report.py and experiments read them)."""
        return {
            "weight_sync/version": float(self.policy_version),
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
    """A backend on one learner rank. Construct it on every rank with the rank's `LearnerState` (a fresh one when
    None: tests, benchmarks); `broker` matters on the coordinator only (the policy-version key, the registry)."""

    def __init__(
        self,
        source: WeightSource,
        state: LearnerState | None,
        broker: Broker | None,
        every_k_steps: int = 1,
        max_consecutive_failures: int = 3,
    ) -> None:
        self.source = source
        self.state = state if state is not None else LearnerState()
        self.every_k_steps = every_k_steps
        self.max_consecutive_failures = max_consecutive_failures
        self._key = broker.policy_version if broker is not None and source.is_coordinator else None
        self._failures = 0
        self._publish()

    def should_push(self, step: int) -> bool:
        return step % self.every_k_steps == 0

    def maybe_push(self, model: Any) -> PushReport | None:
        """Push `model`'s weights when `LearnerState.step` is a push step (a collective on every rank)."""
        return self.push(model) if self.should_push(self.state.step) else None

    def push(self, model: Any) -> PushReport:
        """Push `model`'s weights now, as policy version `LearnerState.step` (a collective on every rank)."""
        version = self.state.step
        assert version >= self.state.policy_version, f"push of version {version} after {self.state.policy_version}"
        t0 = time.monotonic()
        transfer: Transfer = self.source.broadcast_object(self._transfer(version, model))
        if transfer.succeeded:
            self.state.policy_version = version
            self._publish()
            self._failures = 0
        else:
            self._failures += 1
        report = PushReport(
            policy_version=self.state.policy_version,
            ok=transfer.succeeded,
            total_s=time.monotonic() - t0,
            **{f.name: getattr(transfer, f.name) for f in fields(Transfer)},
        )
        if self.source.is_coordinator:
            _log(version, report)
        if self._failures >= self.max_consecutive_failures:
            raise WeightSyncError(
                f"{self._failures} consecutive weight pushes reached no engine (--weight_sync.max_consecutive_failures)"
                f": {report.failed}"
            )
        return report

    @abc.abstractmethod
    def _transfer(self, policy_version: int, model: Any) -> Transfer:
        """Move the weights to the engines and name them `policy_version` there (every rank calls it; only the
        coordinator's result counts). Never publishes, counts or raises on an engine's failure: it reports it."""

    def _publish(self) -> None:
        if self._key is not None:
            self._key.set(self.state.policy_version)

    def close(self) -> None:
        """Release process groups, HTTP clients and threads (idempotent)."""
        return None


def _log(version: int, report: PushReport) -> None:
    for url, why in report.failed.items():
        logger.error("weight sync v%d: engine %s: %s", version, url, why)
    if report.num_engines or report.failed or report.exported_to:
        logger.info(
            "weight sync v%d %s: %d/%d engines, %.1f MB in %.2fs (%.2f GB/s), paused %.2fs, %d attempt(s)",
            version, "ok" if report.ok else "FAILED", len(report.updated), report.num_engines, report.bytes / 1e6,
            report.transfer_s, report.gb_per_s, report.pause_to_continue_s, report.attempts,
        )  # fmt: skip


class NoSync(WeightSync):
    """Pushes nothing: the policy version becomes the step at every push step (learner state and broker key), so
    admission control and staleness drops behave as if every step's weights had reached the engines."""

    def _transfer(self, policy_version: int, model: Any) -> Transfer:
        return Transfer()
