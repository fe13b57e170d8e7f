"""Per-step metrics as JSON lines in the run directory, through one logger with a no-op twin.

Rank 0 writes `<run_dir>/metrics.jsonl` (one object per step: `step`, `time_s`, then the metrics);
the other ranks get `NullMetricsLogger`, so the training loop never asks which rank it is on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import IO, Protocol

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlMetricsLogger:
    """Appends one line per step (a resumed run appends after the lines of the run it resumes)."""

    def __init__(self, run_dir: str | Path) -> None:
        path = Path(run_dir) / METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # Non-finite floats are written as null: json would emit NaN, which strict readers reject.
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time_s": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()
        logger.info(
            "step %d: loss %.4g reward %.3f grad_norm %.3g tokens/s %.0f",
            step,
            metrics.get("loss", math.nan),
            metrics.get("reward_mean", math.nan),
            metrics.get("grad_norm", math.nan),
            metrics.get("tokens_per_s", math.nan),
        )

    def close(self) -> None:
        self._file.close()


class NullMetricsLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def build_metrics_logger(run_dir: str | Path, is_writer: bool) -> MetricsLogger:
    return JsonlMetricsLogger(run_dir) if is_writer else NullMetricsLogger()


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The logged steps of a run directory (for tests and tools)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
