"""Checkpoint directories without torch (learner/checkpoint_catalog.py): retention, finding a checkpoint, the HF
config it exports with, init_from's checks, the listing, and export-hf's argument errors. Checkpoints here are
stand-ins: a step directory with megatron's metadata.json and a learner_state.json (complete) or without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError
from learner.checkpoint_catalog import (
    HF_CONFIG_DIR,
    RECORD_FILE,
    CheckpointRecord,
    checkpoint_roots,
    find_hf_config,
    format_table,
    init_source,
    list_checkpoints,
    prunable,
    resolve_checkpoint,
)
from learner.state import LearnerState
from learner.train_config import CheckpointConfig, TrainConfig


def _step(root: Path, step: int, complete: bool = True, latest: bool = False, **record: Any) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / "__0_0.distcp").write_bytes(b"x" * 1000)
    if record:
        fields = {"step": step, "policy_version": step, "saved_unix_s": 1_700_000_000.0 + step} | record
        (path / RECORD_FILE).write_text(json.dumps(fields))
    if complete:
        LearnerState(step=step, policy_version=step - 1).save(path / "learner_state.json")
    if latest:
        (root / "latest").write_text(path.name + "\n")
    return path


def _hf(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def _train_config(tmp: Path, run_id: str = "new", **checkpoint: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {"hf_path": str(tmp / "hf")},
            "loss": {"mode": "sft"},
            "broker": {"redis_url": "memory://x", "run_id": run_id},
            "run_dir": str(tmp / "new"),
            "checkpoint": checkpoint,
        }
    )


def test_retention_keeps_the_newest_the_kept_versions_and_latest(tmp_path: Path) -> None:
    """Guards against keep_every_steps versions being pruned with the rest, against deleting the checkpoint
    `latest` names (a resume would find nothing) when a newer complete one exists that it does not name yet, and
    against deleting an incomplete save's directory as if it were an old checkpoint."""
    for step in range(1, 10):
        _step(tmp_path, step, latest=step == 9)
    _step(tmp_path, 10, complete=False)
    names = [p.name for p in prunable(tmp_path, keep_last=2, keep_every_steps=4)]
    assert names == [f"step_0000000{s}" for s in (1, 2, 3, 5, 6, 7)]
    assert [p.name for p in prunable(tmp_path, keep_last=2, keep_every_steps=0)][-1] == "step_00000007"

    (tmp_path / "latest").write_text("step_00000005\n")  # a crash after step 9's state, before `latest` moved
    assert "step_00000005" not in [p.name for p in prunable(tmp_path, keep_last=1, keep_every_steps=0)]


def test_keep_every_steps_must_be_a_multiple_of_the_interval() -> None:
    """Guards against a keep_every_steps that keeps nothing because those steps are never saved."""
    assert CheckpointConfig(interval_steps=20, keep_every_steps=100).keep_every_steps == 100
    with pytest.raises(
        ValueError, match="--checkpoint.keep_every_steps 50 must be a multiple of --checkpoint.interval"
    ):
        CheckpointConfig(interval_steps=20, keep_every_steps=50)


def test_resolve_checkpoint_from_a_step_a_checkpoints_or_a_run_directory(tmp_path: Path) -> None:
    """Guards the ways a user names a checkpoint (a step directory, or a checkpoints / run directory meaning its
    latest) and the errors, naming the flag, for a missing, unrelated or half-written one."""
    root = tmp_path / "run" / "checkpoints"
    _step(root, 2)
    step4 = _step(root, 4, latest=True)
    half = _step(root, 6, complete=False)
    assert resolve_checkpoint(root / "step_00000002", "--x") == root / "step_00000002"
    assert resolve_checkpoint(root, "--x") == step4
    assert resolve_checkpoint(tmp_path / "run", "--x") == step4
    with pytest.raises(ValueError, match="--x .*no such directory"):
        resolve_checkpoint(tmp_path / "missing", "--x")
    with pytest.raises(ValueError, match="--x .*not a checkpoint"):
        resolve_checkpoint(tmp_path, "--x")
    with pytest.raises(ValueError, match="incomplete checkpoint .*checkpoints list"):
        resolve_checkpoint(half, "--x")


def test_init_source_checks_that_the_source_is_another_run(tmp_path: Path) -> None:
    """Guards --checkpoint.init_from against starting a "new" run that would share the source run's streams
    (same run id) or checkpoint directory (it would resume the source run itself and prune its checkpoints), and
    against a resume of the new run failing because the source has since been deleted."""
    source = _step(tmp_path / "old" / "checkpoints", 8, latest=True, run_id="old")
    assert init_source(_train_config(tmp_path), resuming=False) is None
    assert init_source(_train_config(tmp_path, init_from=str(source)), resuming=False) == source
    assert init_source(_train_config(tmp_path, init_from=str(tmp_path / "old")), resuming=False) == source
    with pytest.raises(ValueError, match="run id 'old', this run's --broker.run_id"):
        init_source(_train_config(tmp_path, run_id="old", init_from=str(source)), resuming=False)
    own = _train_config(tmp_path, init_from=str(source), dir=str(tmp_path / "old" / "checkpoints"))
    with pytest.raises(ValueError, match="overlaps this run's checkpoint directory"):
        init_source(own, resuming=True)
    gone = _train_config(tmp_path, init_from=str(tmp_path / "deleted" / "step_00000008"))
    assert init_source(gone, resuming=True) is None
    with pytest.raises(ValueError, match="--checkpoint.init_from .*no such directory"):
        init_source(gone, resuming=False)


def test_hf_config_comes_from_the_checkpoint_then_the_run(tmp_path: Path) -> None:
    """Guards export-hf's default HF config: the copy saved with the checkpoint first (the base model directory
    may be gone), then the base model its record names, then the run's config.json for checkpoints saved before
    records; an error naming --hf_config when none is there."""
    base = _hf(tmp_path / "base")
    run = tmp_path / "run"
    legacy = _step(run / "checkpoints", 1)
    (run / "config.json").write_text(json.dumps({"model": {"hf_path": str(base)}}))
    assert find_hf_config(legacy) == base
    recorded = _step(run / "checkpoints", 2, hf_path=str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    assert find_hf_config(recorded) == tmp_path / "other"
    _hf(recorded / HF_CONFIG_DIR)
    assert find_hf_config(recorded) == recorded / HF_CONFIG_DIR
    with pytest.raises(ValueError, match="pass --hf_config DIR"):
        find_hf_config(_step(tmp_path / "lone", 3))


def test_list_shows_every_phase_with_version_time_size_and_marks(tmp_path: Path) -> None:
    """Guards `longtrace checkpoints list` on a `longtrace up` run directory: each phase's checkpoints, oldest first,
    with the policy version (from the record, or learner_state.json for older checkpoints), size, and which is
    latest, kept for good or incomplete."""
    sft = tmp_path / "phases" / "sft" / "checkpoints"
    rl = tmp_path / "phases" / "rl" / "checkpoints"
    _step(sft, 5, latest=True)
    _step(rl, 10, keep_every_steps=10)
    _step(rl, 15, latest=True, keep_every_steps=10)
    _step(rl, 20, complete=False)
    roots = checkpoint_roots(tmp_path)
    assert roots == [rl, sft]
    assert checkpoint_roots(sft) == [sft]
    infos = list_checkpoints(rl)
    assert [(c.step, c.policy_version, c.latest, c.kept, c.complete) for c in infos] == [
        (10, 10, False, True, True),
        (15, 15, True, False, True),
        (20, None, False, False, False),
    ]
    assert all(c.size_bytes >= 1000 for c in infos)
    assert list_checkpoints(sft)[0].policy_version == 4  # no record: learner_state.json's
    assert infos[0].to_json()["saved_at"] == "2023-11-14T22:13:30Z"
    table = format_table({str(r): list_checkpoints(r) for r in roots})
    assert "latest" in table and "kept" in table and "incomplete" in table and str(sft) in table
    with pytest.raises(ValueError, match="no checkpoints"):
        checkpoint_roots(tmp_path / "phases")
    assert CheckpointRecord(step=1).world_size == 1


def _export_args(*argv: str) -> Any:
    from common.cli import parse, root_parser
    from learner.cli import register

    return parse(root_parser([register]), ["export-hf", *argv])


def test_export_hf_cli_names_the_flag_for_a_bad_source(tmp_path: Path) -> None:
    """Guards export-hf's argument errors before anything heavy loads: a --checkpoint that is neither a complete
    checkpoint nor an HF directory names the flag, a half-written checkpoint says so, and source and output are
    each named exactly once."""
    (tmp_path / "junk").mkdir()
    half = _step(tmp_path / "ck", 3, complete=False)
    cases = [
        (("--checkpoint", str(tmp_path / "junk"), "--out", "o"), "--checkpoint .*junk: not a checkpoint.*config.json"),
        (("--checkpoint", str(half), "--out", "o"), "incomplete checkpoint"),
        ((str(tmp_path), "--checkpoint", str(half), "--out", "o"), "name the source once"),
        (("--checkpoint", str(half)), "output directory is required"),
        ((str(half), "o", "--out", "p"), "name the output once"),
    ]
    for argv, message in cases:
        args = _export_args(*argv)
        with pytest.raises(ConfigError, match=message):
            args.func(args)
