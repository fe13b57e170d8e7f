"""The learner's experiment trackers (learner/tracking.py): TensorBoard event files and W&B offline runs written
beside metrics.jsonl through the logger the trainer builds, read back with each tool's own reader."""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import ConfigError, load_config
from deploy.launcher.config import UpConfig
from learner.metrics import JsonlMetricsLogger, read_metrics
from learner.tracking import TrackedMetricsLogger, build_metrics_logger, check_installed
from learner.train_config import TrackingConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]

# Three steps as the trainer logs them: numbers (one of them NaN at step 2), the group ids of the step.
STEPS: list[tuple[int, dict[str, float]]] = [
    (1, {"loss": 0.5, "reward_mean": 0.25, "staleness/0": 2.0, "entropy": 1.5}),
    (2, {"loss": 0.375, "reward_mean": 0.5, "staleness/0": 1.0, "entropy": math.nan}),
    (3, {"loss": 0.125, "reward_mean": 0.75, "staleness/0": 2.0, "entropy": 1.25}),
]


def _train_config(run_dir: Path, *overrides: str) -> TrainConfig:
    base = ["--model.hf_path", "model", "--data.dataset_path", "data.jsonl", "--run_dir", str(run_dir)]
    return load_config(TrainConfig, overrides=[*base, *overrides])


def _log_steps(logger: Any, steps: list[tuple[int, dict[str, float]]] = STEPS) -> None:
    for step, metrics in steps:
        logger.log(step, dict(metrics), trained_group_ids=[f"g{step}"], released_group_ids={"stale": [f"s{step}"]})


def _expected(key: str, steps: list[tuple[int, dict[str, float]]] = STEPS) -> list[tuple[int, float]]:
    return [(step, m[key]) for step, m in steps if math.isfinite(m[key])]


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_step_as_logged(tmp_path: Path) -> None:
    """Guards against TensorBoard curves that differ from metrics.jsonl: another step axis, values lost in a
    writer's buffer when the learner is killed (read back here before close), a NaN sent as a point, or the group
    ids sent as if they were metrics."""
    cfg = _train_config(tmp_path / "run", "--tracking.backends", '["jsonl", "tensorboard"]')
    logger = build_metrics_logger(cfg.run_dir, is_writer=True, tracking=cfg.tracking, resume_step=0)
    try:
        _log_steps(logger, STEPS[:1])  # fewer events than the writer queues: on disk only if flushed every step
        assert _tensorboard_scalars(tmp_path / "run" / "tensorboard").get("loss") == [(1, 0.5)]
        _log_steps(logger, STEPS[1:])
        scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")  # before close: what a kill leaves
    finally:
        logger.close()
    assert set(scalars) == {"loss", "reward_mean", "staleness/0", "entropy"}
    for tag, points in scalars.items():
        want = _expected(tag)
        assert [s for s, _ in points] == [s for s, _ in want], tag
        assert [v for _, v in points] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]  # the jsonl record is still written
    assert read_metrics(tmp_path / "run")[1]["entropy"] is None


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    """Guards against two lineages drawn over each other after a restart: a learner killed after step 3 resumes from
    its checkpoint at step 1 and trains step 2 again; TensorBoard must show that step's new value, as
    metrics.jsonl's lineage does, not the lost run's steps 2 and 3."""
    tracking = TrackingConfig(backends=["jsonl", "tensorboard"])
    first = build_metrics_logger(tmp_path, is_writer=True, tracking=tracking)
    _log_steps(first)
    first.close()
    resumed = build_metrics_logger(tmp_path, is_writer=True, tracking=tracking, resume_step=1)
    resumed.log(2, {"loss": 0.0625})
    resumed.close()
    assert _tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 0.5), (2, 0.0625)]


def _wandb_history(run_file: Path) -> dict[int, dict[str, Any]]:
    """Step -> the logged keys of a .wandb file (a LevelDB-style log of protobuf Records after a 7-byte header)."""
    record_type = importlib.import_module("wandb.proto.wandb_internal_pb2").Record  # generated protobuf classes

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    history: dict[int, dict[str, Any]] = {}
    pos, payload, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = record_type.FromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B in offline mode with every directory it writes under tmp_path; its service process torn down after."""
    wandb = pytest.importorskip("wandb", reason="wandb is the optional `tracking` extra (pip install -e '.[tracking]')")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb-default"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(var, value)
    yield tmp_path
    wandb.teardown()


def test_wandb_offline_run_records_the_logged_history(wandb_offline: Path) -> None:
    """Guards against a W&B run that does not hold what metrics.jsonl holds: no offline run directory under the
    configured dir, another step axis, NaNs or group ids sent as metrics, a run left unfinished at close."""
    run_dir = wandb_offline / "run"
    cfg = _train_config(
        run_dir, "--tracking.backends", '["jsonl", "wandb"]', "--tracking.wandb_dir", str(wandb_offline / "wb")
    )
    assert cfg.tracking.wandb_mode == "offline"
    logger = build_metrics_logger(cfg.run_dir, is_writer=True, tracking=cfg.tracking)
    _log_steps(logger)
    logger.close()
    runs = list((wandb_offline / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    run_files = list(runs[0].glob("run-*.wandb"))
    assert len(run_files) == 1
    history = _wandb_history(run_files[0])
    assert sorted(history) == [1, 2, 3]
    for step, metrics in STEPS:
        assert history[step] == pytest.approx({k: v for k, v in metrics.items() if math.isfinite(v)}), step
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]


def test_a_config_without_jsonl_is_refused(tmp_path: Path) -> None:
    """Guards against a run without metrics.jsonl: the launcher, the report and the chaos bench read it as the
    record of what was trained, so trackers may only come beside it."""
    with pytest.raises(ConfigError, match=r"tracking\.backends.*must include \"jsonl\""):
        _train_config(tmp_path, "--tracking.backends", '["tensorboard"]')
    with pytest.raises(ConfigError, match="tracking.backends"):
        _train_config(tmp_path, "--tracking.backends", '["jsonl", "mlflow"]')


def test_ranks_other_than_0_write_nothing(tmp_path: Path) -> None:
    """Guards against every learner rank writing its own event files or W&B run (N copies of each step, or ranks
    racing on one file): only rank 0 builds trackers."""
    tracking = TrackingConfig(backends=["jsonl", "tensorboard", "wandb"], wandb_dir=str(tmp_path / "wb"))
    logger = build_metrics_logger(tmp_path / "run", is_writer=False, tracking=tracking)
    _log_steps(logger)
    logger.close()
    assert list(tmp_path.iterdir()) == []


class _BrokenTracker:
    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def log(self, step: int, metrics: Any) -> None:
        self.calls += 1
        raise OSError("disk full")

    def close(self) -> None:
        self.closed = True


def test_a_failing_tracker_is_turned_off_and_training_records_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards against a TensorBoard or W&B failure (a full disk, a dead W&B service) ending a long run or losing
    metrics.jsonl lines: the tracker is turned off with a warning, every step still gets its line."""
    broken = _BrokenTracker()
    logger = TrackedMetricsLogger(JsonlMetricsLogger(tmp_path), {"tensorboard": broken})
    _log_steps(logger)
    logger.close()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    assert broken.calls == 1 and broken.closed
    assert "tracking backend tensorboard failed at step 1" in caplog.text


def test_a_missing_tracker_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a bare ImportError (or a crash after the model was built) when a backend's package is not
    installed: the ConfigError names the flag and the pip extra, at start and where the backend is built."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, find_spec finds nothing
    tracking = TrackingConfig(backends=["jsonl", "wandb"])
    with pytest.raises(ConfigError, match=r"tracking\.backends 'wandb'.*\.\[tracking\]"):
        check_installed(tracking)
    with pytest.raises(ConfigError, match=r"tracking\.backends 'wandb'.*\.\[tracking\]"):
        build_metrics_logger(tmp_path, is_writer=True, tracking=tracking)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the refusal


def test_longtrace_up_turns_tensorboard_on_unless_a_section_says_otherwise(tmp_path: Path) -> None:
    """Guards against `longtrace up` learners without TensorBoard by default, event files where the end-of-run
    line does not point, or a user's `tracking` table overridden by the launcher's default."""
    run_dir = tmp_path / "up"
    cfg = load_config(UpConfig, ROOT / "configs" / "debug" / "up.toml", ["--run_dir", str(run_dir)])
    train = cfg.train_config("redis://127.0.0.1:1/0", "rl", "model", "data.jsonl", str(run_dir / "phases" / "rl"))
    assert train.tracking.backends == ["jsonl", "tensorboard"] and train.tracking.run_name == "debug-rl"
    assert cfg.tensorboard_dirs() == {p: run_dir / "phases" / p / "tensorboard" for p in ("sft", "rl")}
    off = load_config(
        UpConfig,
        ROOT / "configs" / "debug" / "up.toml",
        ["--run_dir", str(run_dir), "--phases.rl.learner.tracking.backends", '["jsonl"]'],
    )
    assert off.train_config("redis://x:1/0", "rl", "m", "d", "p").tracking.backends == ["jsonl"]
    assert set(off.tensorboard_dirs()) == {"sft"}
