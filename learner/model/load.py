"""Stream Hugging Face safetensors into this rank's shard of the megatron model.

Each parameter is filled from the few HF tensors it is made of, read one parameter at a time from
memory-mapped safetensors (sharded with `model.safetensors.index.json`, or single files), so a rank
never holds more than its own shard plus the HF tensors of one parameter (no rank holds the model twice).
An expert-parallel rank reads only its own experts, one expert's slice at a time even from fused expert tensors.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.model.build import unwrap
from learner.model.convert import ParamMap, fused_expert_source, param_map
from learner.model.hf_config import HFArch

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class _TensorFile(Protocol):
    """An open safetensors file (safetensors' `safe_open`, whose methods are unannotated)."""

    def get_tensor(self, name: str) -> torch.Tensor: ...

    def get_slice(self, name: str) -> Any: ...


def weight_files(hf_path: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it, from the index json or the single file(s)."""
    from safetensors import safe_open

    root = Path(hf_path)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{root}: no {INDEX_FILE} and no *.safetensors files")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def stage_param_maps(model: torch.nn.Module, arch: HFArch, ep_rank: int | None = None) -> dict[str, ParamMap]:
    """Mapping of every parameter of this rank's (unwrapped) GPTModel, with pipeline layer offsets applied, and
    expert offsets of expert-parallel rank `ep_rank` (default: this rank's; export names other ranks' experts)."""
    gpt: GPTModel = unwrap(model)
    padded_vocab = gpt.vocab_size
    # layer_number is megatron's 1-based global index; it carries the PP offset of this stage.
    layer_numbers = [layer.layer_number - 1 for layer in gpt.decoder.layers]
    offset = 0
    if arch.moe is not None:
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        rank = parallel_state.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
        offset = rank * (arch.moe.num_experts // ep_size)
    return {
        name: param_map(name, arch, padded_vocab, layer_numbers.__getitem__, offset)
        for name, _ in gpt.named_parameters()
    }


def _source(name: str, files: dict[str, Path]) -> str | None:
    """The checkpoint tensor that holds HF tensor `name`: itself, or its layer's fused expert tensor."""
    if name in files:
        return name
    fused = fused_expert_source(name)
    return fused[0] if fused is not None and fused[0] in files else None


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_path: str | Path, arch: HFArch) -> None:
    """Fill every parameter of this rank's model from the HF checkpoint at `hf_path` (casting to the param dtype)."""
    gpt = unwrap(model)
    maps = stage_param_maps(gpt, arch)
    files = weight_files(hf_path)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    missing = sorted({n for m in maps.values() for n in m.hf_names if _source(n, files) is None})
    if missing:
        raise ValueError(f"{hf_path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    params = dict(gpt.named_parameters())
    with ExitStack() as stack:
        handles: dict[Path, _TensorFile] = {}

        def read(name: str) -> torch.Tensor:
            from safetensors import safe_open

            source = _source(name, files)
            assert source is not None, name
            path = files[source]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            if source == name:
                return handles[path].get_tensor(name)
            fused = fused_expert_source(name)
            assert fused is not None
            _, e, part = fused
            fused_slice = handles[path].get_slice(source)  # reads only the rows indexed
            rows = fused_slice.get_shape()[1] // 2
            index = {"gate": slice(None, rows), "up": slice(rows, None), "down": slice(None)}[part]
            tensor: torch.Tensor = fused_slice[e : e + 1, index]
            return tensor[0]

        for name, mapping in maps.items():
            shard = (etp_rank, etp_size) if mapping.expert else (tp_rank, tp_size)
            local = mapping.to_local([read(n) for n in mapping.hf_names], *shard)
            param = params[name]
            if local.shape != param.shape:
                raise ValueError(
                    f"{name}: HF {mapping.hf_names} give shape {tuple(local.shape)}, model has {tuple(param.shape)}"
                )
            param.copy_(local)
    logger.info("loaded %d parameters from %s", len(maps), hf_path)
