"""HF exports on disk: written at every push when `export_dir` is set, loaded by engines that join late, and
the `disk` backend (every engine loads every export with `/update_weights_from_disk`).

Layout: `<export_dir>/v<version, 8 digits>/` is a loadable HF directory (safetensors + config + tokenizer);
`<export_dir>/LATEST` holds {"version", "path"} of the newest complete one. An export is written under a
`.tmp` name and renamed, and LATEST is replaced atomically, so a reader never sees a partial export.

How a new engine is told: an engine that starts between updates would serve its start-up weights, so before
it is routed to (before its launcher registers it in the engine registry) it calls `catch_up(url,
export_dir)`, which loads LATEST with `/update_weights_from_disk` and sets its weight version; `longtrace
weight-sync catch-up --engine URL --export_dir DIR` does the same from a shell. Starting the engine with
`--model <export_dir>/LATEST's path` and `--weight_version <version>` is equivalent. From the next push on
it is a member of the weight-update group like the others.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learner.weight_sync.base import PushReport, WeightSync, WeightSyncError
from learner.weight_sync.client import EngineClient
from learner.weight_sync.config import DiskSyncConfig

if TYPE_CHECKING:  # fleet imports torch; catch_up (run by engine launchers) must stay light
    from learner.weight_sync.fleet import Fleet

logger = logging.getLogger(__name__)

LATEST = "LATEST"


def export_name(version: int) -> str:
    return f"v{version:08d}"


def latest_export(export_dir: str | Path) -> tuple[Path, int] | None:
    """(path, version) of the newest complete export, or None when there is none yet."""
    pointer = Path(export_dir) / LATEST
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text())
    return Path(export_dir).resolve() / data["path"], int(data["version"])


def write_export(source: Any, model: Any, export_dir: str | Path, version: int, keep_last: int) -> Path:
    """Write `model` as export `version` (a collective over the learner's ranks); return its path.

    `source` is a learner.weight_sync.sources.WeightSource. The coordinator renames the finished directory,
    points LATEST at it and deletes all but the newest `keep_last` exports.
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
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer_tmp = root / (LATEST + ".tmp")
        pointer_tmp.write_text(json.dumps({"version": version, "path": final.name}) + "\n")
        os.replace(pointer_tmp, root / LATEST)
        exports = sorted(p for p in root.glob("v*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in exports[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("exported version %d to %s", version, final)
    return final


def load_from_disk(client: EngineClient, url: str, path: Path, version: int, timeout_s: float) -> None:
    """Have one engine load an HF directory and report `version` (SGLang's /update_weights_from_disk)."""
    body = {
        "model_path": str(path),
        "weight_version": str(version),
        "abort_all_requests": False,
        "flush_cache": True,
    }
    client.call(url, "/update_weights_from_disk", body, timeout_s)


def catch_up(
    url: str, export_dir: str | Path, timeout_s: float = 600.0, token_env: str = "LONGTRACE_ENGINE_API_KEY"
) -> int | None:
    """Load the newest export into the engine at `url` (before it is routed to); return its version, or None
    when no export exists yet (the engine keeps its start-up weights, which are then version 0's)."""
    found = latest_export(export_dir)
    if found is None:
        return None
    path, version = found
    client = EngineClient(http_timeout_s=timeout_s, token_env=token_env, max_workers=1)
    try:
        load_from_disk(client, url.rstrip("/"), path, version, timeout_s)
    finally:
        client.close()
    logger.info("engine %s caught up to version %d from %s", url, version, path)
    return version


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
