"""Megatron -> Hugging Face: full HF tensors gathered from TP shards, per pipeline stage; a loadable HF directory.

The model may come from HF weights or from a training checkpoint (`longtrace export-hf --checkpoint`, learner/cli.py):
either way it is this process's layout, whatever layout saved the checkpoint.

`iter_hf_weights` is a collective: every rank of the world must exhaust it (TP ranks take part in the
gathers, and expert-parallel ranks in the gathers of their experts). Only each pipeline stage's leader (TP, CP
and DP rank 0) receives tensors; it yields its stage's parameters, every expert included, under HF names with
global layer and expert indices. Weight sync (issue 8) broadcasts from there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.checkpoint_catalog import copy_hf_config
from learner.model.build import unwrap
from learner.model.hf_config import HFArch, load_hf_arch
from learner.model.load import INDEX_FILE, stage_param_maps
from learner.parallel import current_layout

logger = logging.getLogger(__name__)


@torch.no_grad()
def iter_hf_weights(model: torch.nn.Module, arch: HFArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this stage's parameters on the stage leader; nothing elsewhere.

    Tensors keep the parameter dtype and device. Tied output layers are not yielded (HF ties them).
    """
    gpt = unwrap(model)
    maps = stage_param_maps(gpt, arch)
    leader = current_layout().is_stage_leader
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    etp_group = parallel_state.get_expert_tensor_parallel_group()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    ep_group = parallel_state.get_expert_model_parallel_group()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    # The same local expert of every EP rank: its HF names there (EP rank r holds experts r * local + e).
    ep_maps = [stage_param_maps(gpt, arch, ep_rank=r) for r in range(ep_size)] if arch.moe is not None else []
    for name, param in gpt.named_parameters():
        mapping = maps[name]
        if not mapping.export:
            continue
        local = param.detach().contiguous()
        group, size = (etp_group, etp_size) if mapping.expert else (tp_group, tp_size)
        if mapping.tp_sharded and size > 1:
            shards = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(shards, local, group=group)
        else:
            shards = [local]
        if not (mapping.expert and ep_size > 1):
            if leader:
                yield from zip(mapping.hf_names, mapping.to_hf(shards), strict=True)
            continue
        for k, tensor in enumerate(mapping.to_hf(shards)):  # one HF tensor at a time, from every EP rank
            peers = [torch.empty_like(tensor) for _ in range(ep_size)]
            dist.all_gather(peers, tensor.contiguous(), group=ep_group)
            if leader:
                yield from ((ep_maps[r][name].hf_names[k], peer) for r, peer in enumerate(peers))


def _copy_non_weight_files(src: Path, out: Path, dtype: torch.dtype) -> None:
    copy_hf_config(src, out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    hf_config_dir: str | Path,
    max_shard_mb: int = 2048,
    progress: bool = False,
) -> None:
    """Write a loadable HF directory: safetensors shards + index, and config/tokenizer files from `hf_config_dir`.

    A collective over the whole world. Each stage leader writes its own files (no rank gathers the
    whole model); global rank 0 writes the index and copies the non-weight files (config dtype updated).
    `progress`: a bar of global rank 0's tensors when its stderr is a terminal (`longtrace export-hf`).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = load_hf_arch(hf_config_dir)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0
    dtype = next(unwrap(model).parameters()).dtype

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            file = f"model-pp{stage:03d}-{len({*weight_map.values()}):05d}.safetensors"
            save_file({k: v.cpu() for k, v in pending.items()}, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, file))
            pending, pending_bytes = {}, 0

    shown = None if progress and dist.get_rank() == 0 else True  # None: only on a TTY
    for name, tensor in tqdm(iter_hf_weights(model, arch), desc="export", unit="tensor", disable=shown, leave=False):
        pending[name] = tensor
        pending_bytes += tensor.numel() * tensor.element_size()
        total_bytes += tensor.numel() * tensor.element_size()
        if pending_bytes >= max_shard_mb * 2**20:
            flush()
    flush()
    parts: list[tuple[dict[str, str], int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (weight_map, total_bytes))
    if dist.get_rank() == 0:
        merged = {k: v for part in parts if part for k, v in part[0].items()}
        total = sum(part[1] for part in parts if part)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(merged.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _copy_non_weight_files(Path(hf_config_dir), out, dtype)
        logger.info("exported %d tensors to %s", len(merged), out)
    dist.barrier()
