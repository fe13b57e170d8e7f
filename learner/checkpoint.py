"""Checkpoints: megatron dist_checkpointing (model + optimizer, any TP/PP/DP layout) plus the learner state.

Layout under the checkpoint directory:

    step_00000020/            megatron's sharded files, checkpoint.json and hf_config/ (the run record and the base
                              model's config and tokenizer: learner/checkpoint_catalog.py), and learner_state.json
                              (written last, by rank 0)
    latest                    the name of the newest *complete* checkpoint (replaced atomically)

A checkpoint counts only once `latest` names it, so a crash mid-save leaves the previous one in force.
Only after `latest` is updated does `on_saved` run (rank 0 acks the scored entries the saved steps used); the state
file and `latest` are fsynced first, file and directory (`commit`), so a power loss after those acks cannot bring
back a checkpoint that predates them.
The model has no dropout, so no RNG state is saved: a resumed step is bit-for-bit the step it replaces.

The sharded files hold global tensors (megatron's dist_checkpointing), so a checkpoint loads under any TP/PP/DP
layout: `longtrace export-hf --checkpoint` reads the model part alone on one process, and a new run may start from
another run's checkpoint (`--checkpoint.init_from`, weights with or without the optimizer state).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer import MegatronOptimizer

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.checkpoint_catalog import (
    LATEST,
    STATE_FILE,
    RunRecord,
    find_hf_config,
    prunable,
    step_dir_name,
    write_record,
)
from learner.durable import write_durably
from learner.model.build import unwrap
from learner.model.hf_config import HFArch, load_hf_arch
from learner.state import LearnerState
from learner.train_config import CheckpointConfig

if TYPE_CHECKING:
    from megatron.core.dist_checkpointing.mapping import ShardedStateDict

logger = logging.getLogger(__name__)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    assert (path / STATE_FILE).is_file(), f"{marker} names {path}, which has no {STATE_FILE}"
    return path


def commit(root: str | Path, step_dir: Path, state: LearnerState) -> None:
    """Rank 0's part of a save once every shard is written: the learner state into `step_dir`, then `latest`
    naming it, each durable (fsynced, file and directory) before this returns and anything is acked."""
    state.save(step_dir / STATE_FILE)
    write_durably(Path(root) / LATEST, (step_dir.name + "\n").encode())


def _sharded_state_dict(model: torch.nn.Module, optimizer: MegatronOptimizer, is_loading: bool) -> ShardedStateDict:
    # The bare GPTModel's keys do not depend on the wrappers (DDP, Float16Module) around it.
    model_sd = unwrap(model).sharded_state_dict()
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


class Checkpointer:
    def __init__(
        self,
        cfg: CheckpointConfig,
        root: str | Path,
        max_steps: int,
        model: torch.nn.Module,
        optimizer: MegatronOptimizer,
        state: LearnerState,
        on_saved: Callable[[], object],
        record: RunRecord | None = None,
    ) -> None:
        self._cfg = cfg
        self._record = record
        self.root = Path(root)
        self._max_steps = max_steps
        self._model = model
        self._optimizer = optimizer
        self._state = state
        self._on_saved = on_saved

    def _should_save(self, step: int) -> bool:
        return step % self._cfg.interval_steps == 0 or step >= self._max_steps

    def maybe_save(self, step: int) -> bool:
        if not self._should_save(step):
            return False
        self.save(step)
        return True

    def save(self, step: int) -> Path:
        """Collective: every rank writes its shards; rank 0 writes the state and flips `latest`."""
        t0 = time.monotonic()
        rank0 = dist.get_rank() == 0
        path = self.root / step_dir_name(step)
        if rank0:
            if path.exists():  # a save of this step that crashed before `latest` named it
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(_sharded_state_dict(self._model, self._optimizer, is_loading=False), str(path))
        dist.barrier()
        if rank0:
            if self._record is not None:
                write_record(path, self._record, self._state, dist.get_world_size())
            commit(self.root, path, self._state)
            self._prune()
        dist.barrier()
        self._on_saved()
        logger.info("saved checkpoint %s in %.1fs", path, time.monotonic() - t0)
        return path

    def _prune(self) -> None:
        for old in prunable(self.root, self._cfg.keep_last, self._cfg.keep_every_steps):
            shutil.rmtree(old)


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Restore the model alone from `path` (a collective), under this process's layout whatever the saved one;
    the optimizer's shards are not read."""
    t0 = time.monotonic()
    # RAISE_UNEXPECTED: a tensor the model needs that the checkpoint lacks (another architecture) fails by name
    # before reading; the optimizer's tensors, in the checkpoint and not asked for, are fine.
    try:
        loaded = dist_checkpointing.load(
            {"model": unwrap(model).sharded_state_dict()}, str(path), strict=StrictHandling.RAISE_UNEXPECTED
        )
    except CheckpointingException as e:  # another model than the checkpoint's: the user's to fix
        raise ValueError(f"checkpoint {path} does not fit this model (another architecture?): {e}") from e
    unwrap(model).load_state_dict(loaded["model"])
    logger.info("loaded the weights of %s in %.1fs", path, time.monotonic() - t0)


_SHAPE_FIELDS = (
    "vocab_size",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_word_embeddings",
    "qk_norm",
)


def _check_same_model(path: Path, arch: HFArch) -> None:
    # A vocabulary mismatch would load silently: megatron pads/truncates the embedding rows across layouts.
    try:
        source = load_hf_arch(find_hf_config(path))
    except ValueError:
        return  # no config of the source to compare with: megatron still checks every other shape
    diff = {f: (getattr(source, f), getattr(arch, f)) for f in _SHAPE_FIELDS if getattr(source, f) != getattr(arch, f)}
    if diff:
        raise ValueError(
            f"--checkpoint.init_from {path} holds another model than --model.hf_path: "
            + ", ".join(f"{f} {a} vs {b}" for f, (a, b) in diff.items())
        )


def init_from_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: MegatronOptimizer, arch: HFArch, with_optimizer: bool
) -> None:
    """A new run's start from another run's checkpoint (a collective): its weights, and its optimizer state when
    `with_optimizer`. Its learner state (step, data cursor, groups) belongs to the source run and is not taken."""
    _check_same_model(path, arch)
    if with_optimizer:
        load_checkpoint(path, model, optimizer)
    else:
        load_model_weights(path, model)
        # Mixed precision: the optimizer's fp32 main params were copied from the initial weights; follow the loaded.
        optimizer.reload_model_params()
    logger.info("initialised from %s (%s)", path, "weights and optimizer" if with_optimizer else "weights only")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: MegatronOptimizer) -> LearnerState:
    """Restore model and optimizer from `path` (a collective) and return its learner state."""
    t0 = time.monotonic()
    sharded = _sharded_state_dict(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path))
    unwrap(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    state = LearnerState.load(Path(path) / STATE_FILE)
    logger.info("resumed from %s (step %d) in %.1fs", path, state.step, time.monotonic() - t0)
    return state
