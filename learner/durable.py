"""Files that must survive a power loss before anything that depends on them happens (the learner state and the
checkpoint's `latest` pointer, before the scored entries they cover are acked).

A rename is atomic but not durable until its directory is fsynced, and a file's bytes are not durable until the
file is: `write_durably` does both, in the order that leaves either the old or the new file after a crash.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make the directory's entries (a new or renamed file in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: a temporary file beside it, fsynced, renamed over it,
    then the directory fsynced. A crash leaves the old file or the new one, never a torn or missing one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
