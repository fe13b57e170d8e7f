"""The weight hand-off on disk, shared by the learner (which writes exports) and engine launchers (which load
the newest one): the export layout, the LATEST pointer and late-engine catch-up.

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
from pathlib import Path

from weights.engine_client import EngineClient
from weights.version import format_weight_version

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


def publish_export(export_dir: str | Path, tmp: Path, version: int, keep_last: int) -> Path:
    """Rename a finished export directory `tmp` to its final name, point LATEST at it (atomically) and delete all
    but the newest `keep_last` exports; return the final path."""
    root = Path(export_dir)
    final = root / export_name(version)
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
        "weight_version": format_weight_version(version),
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
