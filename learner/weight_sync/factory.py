"""Pick the weight-sync backend from the `[weight_sync]` section."""

from __future__ import annotations

from broker.base import Broker
from learner.state import LearnerState
from learner.weight_sync.base import NoSync, WeightSync
from learner.weight_sync.config import DiskSyncConfig, DistributedSyncConfig, NoSyncConfig, WeightSyncConfig
from learner.weight_sync.sources import WeightSource


def build_weight_sync(
    cfg: WeightSyncConfig, source: WeightSource, broker: Broker | None, state: LearnerState | None = None
) -> WeightSync:
    """The backend for `cfg`, on every learner rank. `broker` matters on the coordinator (global rank 0) only:
    the engine registry and the policy-version key. `state` is this rank's LearnerState, whose policy version
    the backend advances (a fresh one when None)."""
    coordinator_broker = broker if source.is_coordinator else None
    if isinstance(cfg, NoSyncConfig):
        return NoSync(source, state, coordinator_broker)
    if isinstance(cfg, DistributedSyncConfig):
        from learner.weight_sync.distributed import DistributedWeightSync

        return DistributedWeightSync(cfg, source, coordinator_broker, state)
    assert isinstance(cfg, DiskSyncConfig)
    from learner.weight_sync.disk import DiskWeightSync

    return DiskWeightSync(cfg, source, coordinator_broker, state)
