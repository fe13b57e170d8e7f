"""Megatron's parallel state from torchrun's environment: one process group, then TP/PP/CP/DP(/EP) groups.

NCCL when CUDA is present, gloo otherwise; the same code runs both. DP is what is left of the world
after TP * PP * CP. Expert parallelism (MoE) splits each layer's experts over EP ranks taken from DP x CP
(megatron's expert grid: expert-TP = TP, EP, expert-DP = world / (TP * EP * PP)). Every collective of these
groups times out after `dist_timeout_s`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.config import LearnerModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's coordinates in the TP x CP x DP x PP grid, and in the expert-parallel one (MoE)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int = 0
    ep_size: int = 1

    @property
    def is_stage_leader(self) -> bool:
        """The one rank of this pipeline stage that yields/writes exported weights (TP, CP and DP rank 0)."""
        return self.tp_rank == 0 and self.dp_rank == 0 and parallel_state.get_context_parallel_rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init_parallel(config: LearnerModelConfig) -> ParallelLayout:
    """Join torchrun's process group (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) and build megatron's groups.

    Without torchrun's variables this is a world of one (a single local process). Seeds megatron's
    RNG tracker with `config.seed`.
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    model_parallel = config.tp_size * config.pp_size * config.cp_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by --model.tp_size * --model.pp_size * --model.cp_size"
            f" = {model_parallel}"
        )
    expert_parallel = config.tp_size * config.pp_size * config.ep_size
    if world_size % expert_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by --model.tp_size * --model.pp_size * --model.ep_size"
            f" = {expert_parallel}"
        )
    assert not parallel_state.model_parallel_is_initialized(), "call destroy_parallel(keep_process_group=True) first"
    timeout = datetime.timedelta(seconds=config.dist_timeout_s)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if torch.cuda.is_available():
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tp_size,
        pipeline_model_parallel_size=config.pp_size,
        context_parallel_size=config.cp_size,
        expert_model_parallel_size=config.ep_size,
        distributed_timeout_minutes=max(1, round(config.dist_timeout_s / 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(config.seed)
    layout = current_layout()
    logger.info("parallel layout %s (backend %s)", layout, dist.get_backend())
    return layout


def current_layout() -> ParallelLayout:
    """The layout of this rank; megatron's parallel state must be initialised."""
    assert parallel_state.model_parallel_is_initialized(), "call init_parallel first"
    return ParallelLayout(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
    )


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and, unless `keep_process_group`, the default process group (idempotent).

    Keeping the process group lets one process re-initialise megatron with another TP/PP layout.
    """
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()


_TIMEOUT_MARKS = ("Timed out waiting", "Watchdog caught collective operation timeout")  # gloo, NCCL


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within `model.dist_timeout_s`: another rank is unreachable or stuck."""


def collective_timeout(
    e: BaseException, timeout_s: float, step: int, checkpoint_every: int
) -> CollectiveTimeout | None:
    """`e` as the error a user can act on, when it is a gloo or NCCL collective timing out (their own messages
    name neither the cause nor the way back); None for any other error."""
    if not isinstance(e, RuntimeError) or not any(m in str(e) for m in _TIMEOUT_MARKS):
        return None
    return CollectiveTimeout(
        f"a collective timed out after {timeout_s:g} s (--model.dist_timeout_s) after step {step}: another rank is "
        "unreachable or stuck (a learner node cut off, a hung process); every rank stops. Once the nodes reach each "
        "other again, start the learner on every node (deploy/torchrun/learner.sh): it resumes from the last "
        f"checkpoint (one every {checkpoint_every} steps, --checkpoint.interval_steps). The collective's own error: {e}"
    )
