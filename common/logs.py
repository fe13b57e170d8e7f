"""Logging, configured once per entrypoint: plain text on a terminal, JSON lines for services."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_WARNED: set[str] = set()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
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
        fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
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
