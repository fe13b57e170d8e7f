"""Per-step metrics as JSON lines in the run directory, through one logger with a no-op twin.

Rank 0 writes `<run_dir>/metrics.jsonl` (one object per step: `step`, `time_s`, the metrics, then
`trained_group_ids`, the ids of the groups the step trained, and `released_group_ids`, cause -> the ids of the
groups given up on since the previous step: dropped stale or zero-variance, or dead-lettered); the other ranks get `NullMetricsLogger`, so the
training loop never asks which rank it is on. Each line is flushed when written, so the file survives a kill of
the learner: it is the independent record of what was trained (a chaos bench counts duplicates from it). A resumed
run appends after the lines of the run it resumes, so a step lost with a killed learner and trained again appears
twice: its last line is the one of the lineage that went on.

`learner/tracking.py` builds the trainer's logger (`build_metrics_logger`): this file's line first, then the
experiment trackers of `--tracking.backends` (TensorBoard, W&B) with the same step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# The two keys whose values are not numbers: a list of group ids, and cause -> list of group ids.
TRAINED_GROUP_IDS = "trained_group_ids"
RELEASED_GROUP_IDS = "released_group_ids"


class MetricsLogger(Protocol):
    def log(
        self,
        step: int,
        metrics: dict[str, float],
        trained_group_ids: Sequence[str] = (),
        released_group_ids: Mapping[str, Sequence[str]] | None = None,
    ) -> None: ...

    def close(self) -> None: ...


class JsonlMetricsLogger:
    """Appends one line per step (a resumed run appends after the lines of the run it resumes)."""

    def __init__(self, run_dir: str | Path) -> None:
        path = Path(run_dir) / METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def log(
        self,
        step: int,
        metrics: dict[str, float],
        trained_group_ids: Sequence[str] = (),
        released_group_ids: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        # Non-finite floats are written as null: json would emit NaN, which strict readers reject.
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        line = {
            "step": step,
            "time_s": round(time.time(), 3),
            **clean,
            TRAINED_GROUP_IDS: list(trained_group_ids),
            RELEASED_GROUP_IDS: {cause: list(ids) for cause, ids in (released_group_ids or {}).items()},
        }
        self._file.write(json.dumps(line) + "\n")
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
    def log(
        self,
        step: int,
        metrics: dict[str, float],
        trained_group_ids: Sequence[str] = (),
        released_group_ids: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged steps of a run directory (for tests and tools): numbers, and the `trained_group_ids` list."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lineage_lines(lines: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Step -> its line, in the lineage that went on (from `read_metrics`): a resumed run logs again from the step
    after its checkpoint, so a line whose step is not above the previous one's replaces that step and every later
    one of the lineage it ends."""
    lineage: dict[int, dict[str, Any]] = {}
    for m in lines:
        step = int(m["step"])
        for later in [s for s in lineage if s >= step]:
            del lineage[later]
        lineage[step] = m
    return lineage


def trained_lineage(lines: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Step -> the ids of the groups it trained, in the lineage that went on (`lineage_lines`)."""
    return {step: list(m.get(TRAINED_GROUP_IDS, [])) for step, m in lineage_lines(lines).items()}
