"""The `disk` weight-sync backend (every engine loads every export with `/update_weights_from_disk`) and the
learner's side of HF exports: written at every push when `export_dir` is set. The layout, LATEST and late-engine
catch-up are the hand-off protocol in weights/exports.py.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.base import Broker
from learner.state import LearnerState
from learner.weight_sync.base import Transfer, WeightSync
from learner.weight_sync.config import DiskSyncConfig
from weights.exports import export_name, load_from_disk, publish_export

if TYPE_CHECKING:  # sources imports torch
    from learner.weight_sync.sources import WeightSource

logger = logging.getLogger(__name__)


def write_export(source: WeightSource, model: Any, export_dir: str | Path, version: int, keep_last: int) -> Path:
    """Write `model` as the export of policy version `version` (a collective over the learner's ranks); return its
    path. The coordinator publishes the finished directory (weights/exports.py: rename, LATEST, pruning to the
    newest `keep_last`)."""
    root = Path(export_dir)
    final = root / export_name(version)
    tmp = root / (export_name(version) + ".tmp")
    if source.is_coordinator:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier export
    source.barrier()
    source.export(model, tmp)
    source.barrier()
    if source.is_coordinator:
        publish_export(root, tmp, version, keep_last)
    return final


class DiskWeightSync(WeightSync):
    """Every push: write an export (all ranks), then pause every engine, have it load the export, resume.

    A failed load leaves that engine's previous weights in place (the built-in engine and SGLang validate
    before loading), so every reachable engine is resumed.
    """

    def __init__(
        self,
        cfg: DiskSyncConfig,
        source: WeightSource,
        broker: Broker | None = None,
        state: LearnerState | None = None,
    ) -> None:
        """Construct on every learner rank; the coordinator talks to the engines (`broker`: its registry)."""
        from learner.weight_sync.fleet import Fleet, control_client  # imports torch

        super().__init__(source, state, broker, cfg.every_k_steps, cfg.max_consecutive_failures)
        self.cfg = cfg
        self.client = control_client(cfg) if source.is_coordinator else None
        self.fleet = Fleet(cfg, self.client, broker) if self.client is not None else None

    def _transfer(self, policy_version: int, model: Any) -> Transfer:
        path = write_export(self.source, model, self.cfg.export_dir, policy_version, self.cfg.export_keep_last)
        t = Transfer(exported_to=str(path), attempts=1)
        if self.fleet is not None and self.client is not None:
            self._load_everywhere(t, path, policy_version)
        return t

    def _load_everywhere(self, t: Transfer, path: Path, policy_version: int) -> None:
        assert self.fleet is not None and self.client is not None
        fleet, client = self.fleet, self.client
        engines, t.failed = fleet.discover()
        t.num_engines = len(engines)
        t_pause = time.monotonic()
        t.failed |= fleet.pause(engines)
        paused = [e for e in engines if e.url not in t.failed]
        timeout_s = self.cfg.load_timeout_s
        t1 = time.monotonic()
        _, errors = client.for_all(
            [e.url for e in paused],
            lambda url: load_from_disk(client, url, path, policy_version, timeout_s),
            timeout_s + 10,
        )
        t.transfer_s = time.monotonic() - t1
        t.failed |= errors
        t.updated = [e.url for e in paused if e.url not in errors]
        t.failed |= fleet.resume(paused)
        t.pause_to_continue_s = time.monotonic() - t_pause
        t.bytes = sum(f.stat().st_size for f in path.glob("*.safetensors")) * len(t.updated)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
