"""Pick the weight-sync backend from the `[weight_sync]` section."""

from __future__ import annotations

from broker.base import Broker
from learner.weight_sync.base import NoSync, WeightSync
from learner.weight_sync.config import DiskSyncConfig, DistributedSyncConfig, NoSyncConfig, WeightSyncConfig
from learner.weight_sync.sources import WeightSource


def build_weight_sync(
    cfg: WeightSyncConfig, source: WeightSource, broker: Broker | None, initial_version: int = 0
) -> WeightSync:
    """The backend for `cfg`, on every learner rank. `broker` matters on the coordinator (global rank 0) only:
    the engine registry and the policy-version key. `initial_version` is the resumed policy version."""
    key = broker.policy_version if broker is not None and source.is_coordinator else None
    if isinstance(cfg, NoSyncConfig):
        return NoSync(key, initial_version)
    if isinstance(cfg, DistributedSyncConfig):
        from learner.weight_sync.distributed import DistributedWeightSync

        return DistributedWeightSync(cfg, source, broker if source.is_coordinator else None, initial_version)
    assert isinstance(cfg, DiskSyncConfig)
    from learner.weight_sync.disk import DiskWeightSync
    from learner.weight_sync.fleet import Fleet
    from weights.engine_client import EngineClient

    if not source.is_coordinator:
        return DiskWeightSync(cfg, source, None, None, initial_version)
    client = EngineClient(cfg.http_timeout_s, cfg.http_attempts, cfg.control_token_env)
    return DiskWeightSync(cfg, source, Fleet(cfg, client, broker), client, initial_version)
