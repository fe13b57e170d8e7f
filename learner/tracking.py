"""Experiment trackers for the learner's per-step metrics: TensorBoard event files and W&B runs, beside metrics.jsonl.

`build_metrics_logger` (the trainer's) gives rank 0 one logger that writes the step's line in metrics.jsonl
(learner/metrics.py, unchanged: the independent record other code reads) and then sends the step to each tracker
of `--tracking.backends`, on the same `step` axis; the other ranks get `NullMetricsLogger` and create nothing.
Trackers get the numeric metrics only: non-finite values are skipped (metrics.jsonl writes them as null) and the
group-id lists stay in metrics.jsonl.

- tensorboard: `torch.utils.tensorboard.SummaryWriter` on `--tracking.tensorboard_dir` (default
  <run_dir>/tensorboard), flushed after every step so a killed learner keeps its events. A resumed run purges
  the events after its checkpoint's step (`purge_step`), as metrics.jsonl's lineage lets the retrained steps
  replace the lost ones.
- wandb: `wandb.init(mode=--tracking.wandb_mode)` (offline by default: the run is written under
  <wandb_dir>/wandb/ for a later `wandb sync`), `run.log(metrics, step=step)`; each start of the learner is a new
  W&B run.

tensorboard and wandb are imported only when their backend is built; a missing package is a ConfigError naming
`tracking.backends` and the pip install that brings it. A tracker that fails while logging is turned off with a
warning: training goes on, metrics.jsonl keeps the record.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from common.config import ConfigError
from learner.metrics import JsonlMetricsLogger, MetricsLogger, NullMetricsLogger
from learner.train_config import TrackingConfig

logger = logging.getLogger(__name__)

TENSORBOARD_SUBDIR = "tensorboard"
# backend -> (the module it needs, how to install it)
_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install -e '.[learner]' (the learner extra holds tensorboard)"),
    "wandb": ("wandb", "pip install -e '.[tracking]' (the `tracking` extra)"),
}


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _missing(backend: str) -> ConfigError:
    module, install = _PACKAGES[backend]
    return ConfigError(
        f"--tracking.backends {backend!r} needs the {module!r} package, which is not installed: {install}"
    )


def check_installed(cfg: TrackingConfig) -> None:
    """Raise the ConfigError of a backend whose package is missing, before anything is built (a cheap look-up)."""
    for backend in cfg.backends:
        if backend in _PACKAGES and importlib.util.find_spec(_PACKAGES[backend][0]) is None:
            raise _missing(backend)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a step's metrics (anything else, lists of group ids included, is left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


def tensorboard_dir(cfg: TrackingConfig, run_dir: str | Path) -> Path:
    return Path(cfg.tensorboard_dir) if cfg.tensorboard_dir else Path(run_dir) / TENSORBOARD_SUBDIR


class TensorBoardTracker:
    """One scalar per metric and step in TensorBoard event files, flushed every step."""

    def __init__(self, log_dir: Path, resume_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises it when the tensorboard package is absent
            raise _missing("tensorboard") from e
        log_dir.mkdir(parents=True, exist_ok=True)
        # Resumed from the checkpoint at `resume_step`: the steps after it are logged again, and their earlier
        # events (from the run that died) are purged by TensorBoard's readers.
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for tag, value in scalars(metrics).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """One W&B run per learner start; `run.log(metrics, step=step)` per step."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path) -> None:
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb") from e
        directory = Path(cfg.wandb_dir or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self._teardown = wandb.teardown
        self._run = wandb.init(
            project=cfg.wandb_project,
            mode=cfg.wandb_mode,
            dir=str(directory),
            name=cfg.run_name or None,
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(scalars(metrics), step=step)

    def close(self) -> None:
        # finish() alone returned before W&B's service process had written the history (seen on a loaded machine:
        # an offline run file without a step); teardown waits for the service to flush and exit.
        self._run.finish()
        self._teardown()


def build_trackers(cfg: TrackingConfig, run_dir: str | Path, resume_step: int = 0) -> dict[str, Tracker]:
    """The trackers of `cfg.backends` (jsonl excluded: it is the metrics logger itself), in the configured order."""
    trackers: dict[str, Tracker] = {}
    try:
        for backend in cfg.backends:
            if backend == "tensorboard":
                trackers[backend] = TensorBoardTracker(tensorboard_dir(cfg, run_dir), resume_step)
            elif backend == "wandb":
                trackers[backend] = WandbTracker(cfg, run_dir)
    except BaseException:
        for name, tracker in trackers.items():
            _close_quietly(name, tracker)
        raise
    return trackers


class TrackedMetricsLogger:
    """metrics.jsonl first, then every tracker; a tracker that raises is turned off with a warning."""

    def __init__(self, jsonl: MetricsLogger, trackers: Mapping[str, Tracker]) -> None:
        self._jsonl = jsonl
        self._trackers = dict(trackers)

    def log(
        self,
        step: int,
        metrics: dict[str, float],
        trained_group_ids: Sequence[str] = (),
        released_group_ids: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._jsonl.log(step, metrics, trained_group_ids, released_group_ids)
        for name, tracker in list(self._trackers.items()):
            try:
                tracker.log(step, metrics)
            except Exception:
                logger.warning(
                    "tracking backend %s failed at step %d; turned off (metrics.jsonl goes on)",
                    name,
                    step,
                    exc_info=True,
                )
                del self._trackers[name]
                _close_quietly(name, tracker)

    def close(self) -> None:
        try:
            for name, tracker in self._trackers.items():
                _close_quietly(name, tracker)
        finally:
            self._jsonl.close()


def _close_quietly(name: str, tracker: Tracker) -> None:
    try:
        tracker.close()
    except Exception:
        logger.warning("closing tracking backend %s failed", name, exc_info=True)


def build_metrics_logger(
    run_dir: str | Path,
    is_writer: bool,
    tracking: TrackingConfig | None = None,
    resume_step: int = 0,
    extra_trackers: Mapping[str, Tracker] | None = None,
) -> MetricsLogger:
    """Rank 0 (`is_writer`): metrics.jsonl in `run_dir`, then the trackers of `tracking` (none by default) and
    `extra_trackers` (the Prometheus exporter, learner/prom.py); `resume_step` is the step of the checkpoint the run
    resumed from (0: a fresh run). Other ranks: a no-op."""
    if not is_writer:
        return NullMetricsLogger()
    trackers = build_trackers(tracking or TrackingConfig(), run_dir, resume_step)  # before the file is opened
    trackers.update(extra_trackers or {})
    jsonl = JsonlMetricsLogger(run_dir)
    return TrackedMetricsLogger(jsonl, trackers) if trackers else jsonl
