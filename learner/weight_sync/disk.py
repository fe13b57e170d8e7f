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

from learner.weight_sync.base import PushReport, WeightSync, WeightSyncError
from learner.weight_sync.config import DiskSyncConfig
from weights.engine_client import EngineClient
from weights.exports import export_name, load_from_disk, publish_export

if TYPE_CHECKING:  # fleet imports torch
    from learner.weight_sync.fleet import Fleet

logger = logging.getLogger(__name__)


def write_export(source: Any, model: Any, export_dir: str | Path, version: int, keep_last: int) -> Path:
    """Write `model` as export `version` (a collective over the learner's ranks); return its path.

    `source` is a learner.weight_sync.sources.WeightSource. The coordinator publishes the finished directory
    (weights/exports.py: rename, LATEST, pruning to the newest `keep_last`).
    """
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
        source: Any,
        fleet: Fleet | None,
        client: EngineClient | None,
        initial_version: int = 0,
    ) -> None:
        assert (fleet is not None) == source.is_coordinator, "exactly the coordinator talks to the engines"
        self.cfg = cfg
        self.every_k_steps = cfg.every_k_steps
        self.source = source
        self.fleet = fleet
        self.client = client
        self.version = initial_version
        self._failures = 0

    def push(self, version: int, model: Any) -> PushReport:
        t0 = time.monotonic()
        path = write_export(self.source, model, self.cfg.export_dir, version, self.cfg.export_keep_last)
        report = PushReport(version=self.version, exported_to=str(path), attempts=1)
        if self.fleet is not None and self.client is not None:
            self._push_to_engines(report, path, version)
            report.total_s = time.monotonic() - t0
        report = self._share(report)
        self.version = report.version
        if not report.ok:
            self._failures += 1
            if self._failures >= self.cfg.max_consecutive_failures:
                raise WeightSyncError(f"{self._failures} consecutive pushes reached no engine: {report.failed}")
        else:
            self._failures = 0
        return report

    def _push_to_engines(self, report: PushReport, path: Path, version: int) -> None:
        assert self.fleet is not None and self.client is not None
        fleet, client = self.fleet, self.client
        engines, report.failed = fleet.discover()
        report.num_engines = len(engines)
        t_pause = time.monotonic()
        report.failed |= fleet.pause(engines)
        paused = [e for e in engines if e.url not in report.failed]
        timeout_s = self.cfg.load_timeout_s
        t1 = time.monotonic()
        _, errors = client.for_all(
            [e.url for e in paused], lambda url: load_from_disk(client, url, path, version, timeout_s), timeout_s + 10
        )
        report.transfer_s = time.monotonic() - t1
        report.failed |= errors
        report.updated = [e.url for e in paused if e.url not in errors]
        report.failed |= fleet.resume(paused)
        report.pause_to_continue_s = time.monotonic() - t_pause
        report.bytes = sum(f.stat().st_size for f in path.glob("*.safetensors")) * len(report.updated)
        # The export is the newest weights whether or not an engine took them: late engines load it.
        fleet.publish_version(version)
        report.version = version
        report.ok = bool(report.updated) or not engines
        for url, why in report.failed.items():
            logger.error("weight sync v%d: engine %s failed: %s", version, url, why)

    def _share(self, report: PushReport) -> PushReport:
        """The coordinator's report on every rank."""
        shared: PushReport = self.source.broadcast_object(report)
        return shared

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
