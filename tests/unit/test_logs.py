"""Log lines from `setup_logging`: ISO 8601 UTC timestamps in the text and the JSON format, `warn_once`."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator

import pytest

from common.logs import iso_utc, setup_logging, warn_once

ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("longtrace.test", logging.INFO, __file__, 1, "hello %s", ("node",), None)
    record.created = created
    return record


def test_iso_utc_is_utc_to_the_millisecond_and_rounds_as_ts() -> None:
    """Guards against local-time or second-resolution stamps (the logs of nodes in other zones would not line
    up) and against `time` and the numeric `ts` of one JSON line disagreeing at a second's edge."""
    assert iso_utc(1796547001.1234) == "2026-12-06T08:50:01.123Z"
    assert iso_utc(1796547001.9996) == "2026-12-06T08:50:02.000Z"  # round(ts, 3) == 1796547002.0
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"


def test_text_lines_start_with_the_iso_utc_time(root_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Guards against the text format's bare %H:%M:%S (no date, no zone): each line now starts with the full
    UTC stamp, then the prefix, level and logger."""
    setup_logging("INFO", json_lines=False, prefix="[rank 0] ")
    handler = logging.getLogger().handlers[0]
    assert (
        handler.format(_record(1796547001.1234)) == "2026-12-06T08:50:01.123Z [rank 0] INFO longtrace.test: hello node"
    )
    before = time.time()
    logging.getLogger("longtrace.test").warning("now")
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"({ISO_UTC}) \[rank 0\] WARNING longtrace.test: now", line), line
    assert line[:23] >= iso_utc(before)[:23]  # a UTC stamp sorts as text, so it is not a local time behind UTC


def test_json_lines_keep_numeric_ts_and_add_iso_time(root_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Guards against breaking readers of the numeric `ts` while adding the ISO `time` beside it."""
    setup_logging("INFO", json_lines=True)
    handler = logging.getLogger().handlers[0]
    out = json.loads(handler.format(_record(1796547001.1234)))
    assert out == {
        "ts": 1796547001.123,
        "time": "2026-12-06T08:50:01.123Z",
        "level": "INFO",
        "logger": "longtrace.test",
        "msg": "hello node",
    }
    logging.getLogger("longtrace.test").info("live")
    live = json.loads(capsys.readouterr().err)
    assert isinstance(live["ts"], float) and live["time"] == iso_utc(live["ts"]) and live["msg"] == "live"


def test_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    """Guards against a repeated warning flooding the log."""
    logger = logging.getLogger("longtrace.test.once")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            warn_once(logger, "test_logs: only once")
    assert [r.getMessage() for r in caplog.records].count("test_logs: only once") == 1
