"""Logging, configured once per entrypoint: plain text on a terminal, JSON lines for services.

Every line is stamped in ISO 8601, UTC, to the millisecond (`2026-12-06T08:50:01.123Z`), so the logs of several
nodes sort and line up as they are; JSON lines keep the numeric `ts` (Unix seconds) beside it as `time`."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_WARNED: set[str] = set()


def iso_utc(unix_s: float) -> str:
    """`unix_s` as ISO 8601 in UTC to the millisecond, e.g. 2026-12-06T08:50:01.123Z (rounded as the JSON `ts`)."""
    seconds, ms = divmod(round(unix_s * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


class IsoFormatter(logging.Formatter):
    """A logging.Formatter whose %(asctime)s is `iso_utc` (for any handler: a run's file log, a harness's)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return iso_utc(record.created)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "time": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str | None = None, json_lines: bool | None = None, prefix: str = "") -> None:
    """Configure the root logger. LONGTRACE_LOG_LEVEL and LONGTRACE_LOG_JSON override the defaults."""
    level = level or os.environ.get("LONGTRACE_LOG_LEVEL", "INFO")
    if json_lines is None:
        json_lines = os.environ.get("LONGTRACE_LOG_JSON", "0") == "1"
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(IsoFormatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def warn_once(logger: logging.Logger, msg: str) -> None:
    """Log a warning the first time `msg` is seen in this process."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        logger.warning(msg)
