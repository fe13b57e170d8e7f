"""The SGLang release LongTrace is contract-tested against, and what follows from it for the weight hand-off.

`SGLANG_VERSION` is the one pin: the engine image (deploy/docker/Dockerfile `SGLANG_IMAGE`), docs/deploy.md and
tests/unit/test_sglang_contract.py (which downloads this release's wheel and checks our clients' routes and
fields, the built-in engine and `engine launch --backend sglang`'s command line against its source) agree with it.
Real SGLang has not been run by this project yet: deploy/gpu/sglang_smoke.sh is the check that needs a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SGLANG_VERSION = "0.5.23"
ENGINE_IMAGE = f"lmsysorg/sglang:v{SGLANG_VERSION}"
ENGINE_TORCH_VERSION = "2.14.1"
"""The torch the engine image runs: sglang 0.5.23's wheel requires `torch==2.14.1` (its METADATA Requires-Dist)."""
ENGINE_NCCL_VERSION = "2.30.7"
"""The NCCL of the engine image: torch 2.14.1 (PyPI, CUDA 13.0) requires `nvidia-nccl-cu13==2.30.7`. The learner
must run the same release (NCCL refuses a communicator whose members' versions differ): the learner image installs
`nvidia-nccl-cu12==2.30.7` over its torch's own pin (deploy/docker/Dockerfile `NCCL_VERSION`)."""


def engine_ranks(server_info: Mapping[str, Any]) -> int:
    """How many ranks an engine adds to the weight-update group: every GPU it runs on, from `/get_server_info`.

    Every scheduler process of an SGLang engine handles `/init_weights_update_group` and joins the group
    (0.5.23: srt/managers/scheduler_components/request_receiver.py passes control requests to every TP rank and
    pipeline stage), so the count is tp_size x pp_size x dp_size (data-parallel replicas, tp x pp GPUs each).
    Attention data parallelism splits the TP group's attention and adds no GPU: 0.5.23 reports it as
    `attn_dp_size` beside a `dp_size` that counts replicas only; releases before it report `--dp-size N
    --enable-dp-attention` as dp_size N with enable_dp_attention true, which is then not a replica count.
    The built-in engine reports 1 for each.
    """
    tp, pp, replicas = _layout(server_info)
    return tp * pp * replicas


def distributed_update_problem(server_info: Mapping[str, Any]) -> str | None:
    """Why an SGLang engine with this layout cannot take `/update_weights_from_distributed` pushes, or None.

    Read in SGLang 0.5.23: the tokenizer manager asserts dp_size == 1 on `/init_weights_update_group`
    (srt/managers/tokenizer_control_mixin.py), and each process joins at rank `rank_offset + tp_rank`
    (srt/model_executor/model_runner_components/weight_updater.py), the same rank on every pipeline stage.
    """
    _, pp, replicas = _layout(server_info)
    if replicas > 1:
        return f"SGLang refuses /init_weights_update_group with data-parallel replicas (dp_size {replicas})"
    if pp > 1:
        return f"SGLang joins every pipeline stage at rank rank_offset + tp_rank, so stages collide (pp_size {pp})"
    return None


def _layout(server_info: Mapping[str, Any]) -> tuple[int, int, int]:
    """(tp_size, pp_size, data-parallel replicas) of an engine's `/get_server_info`."""
    tp, pp, dp = (int(server_info.get(key) or 1) for key in ("tp_size", "pp_size", "dp_size"))
    if "attn_dp_size" not in server_info and server_info.get("enable_dp_attention"):
        dp = 1  # before 0.5.23: `--dp-size N --enable-dp-attention` is attention DP inside the TP group
    return tp, pp, dp


def nccl_mismatch(ours: str | None, server_info: Mapping[str, Any]) -> str | None:
    """Why an NCCL weight-update group of this process with the engine would fail, or None when the releases
    agree or one is unknown. The built-in engine reports its own (`nccl_version`); SGLang reports none, so an
    SGLang engine is taken to run the pinned image's. NCCL builds the communicator lazily and refuses it at the
    first broadcast with "Mismatched NCCL version" (or hangs): checked before the group is built instead."""
    theirs = server_info.get("nccl_version", ENGINE_NCCL_VERSION)
    if not ours or not theirs or str(theirs) == ours:
        return None
    where = "reported by the engine" if "nccl_version" in server_info else f"of the engine image {ENGINE_IMAGE}"
    return (
        f"NCCL {ours} here, {theirs} {where}: NCCL refuses a communicator whose members run different releases "
        "(pin the learner's with the Dockerfile's NCCL_VERSION)"
    )
