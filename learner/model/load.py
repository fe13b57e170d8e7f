"""Stream Hugging Face safetensors into this rank's shard of the megatron model.

Each parameter is filled from the few HF tensors it is made of, read one parameter at a time from
memory-mapped safetensors (sharded with `model.safetensors.index.json`, or single files), so a rank
never holds more than its own shard plus the HF tensors of one parameter (no rank holds the model twice).
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.model.build import unwrap
from learner.model.convert import ParamMap, param_map
from learner.model.hf_config import HFArch

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class _TensorFile(Protocol):
    """An open safetensors file (safetensors' `safe_open`, whose methods are unannotated)."""

    def get_tensor(self, name: str) -> torch.Tensor: ...


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


def stage_param_maps(model: torch.nn.Module, arch: HFArch) -> dict[str, ParamMap]:
    """Mapping of every parameter of this rank's (unwrapped) GPTModel, with pipeline layer offsets applied."""
    gpt: GPTModel = unwrap(model)
    padded_vocab = gpt.vocab_size
    # layer_number is megatron's 1-based global index; it carries the PP offset of this stage.
    layer_numbers = [layer.layer_number - 1 for layer in gpt.decoder.layers]
    return {name: param_map(name, arch, padded_vocab, layer_numbers.__getitem__) for name, _ in gpt.named_parameters()}


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_path: str | Path, arch: HFArch) -> None:
    """Fill every parameter of this rank's model from the HF checkpoint at `hf_path` (casting to the param dtype)."""
    gpt = unwrap(model)
    maps = stage_param_maps(gpt, arch)
    files = weight_files(hf_path)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    missing = sorted({n for m in maps.values() for n in m.hf_names if n not in files})
    if missing:
        raise ValueError(f"{hf_path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    params = dict(gpt.named_parameters())
    with ExitStack() as stack:
        handles: dict[Path, _TensorFile] = {}

        def read(name: str) -> torch.Tensor:
            from safetensors import safe_open

            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name)

        for name, mapping in maps.items():
            local = mapping.to_local([read(n) for n in mapping.hf_names], tp_rank, tp_size)
            param = params[name]
            if local.shape != param.shape:
                raise ValueError(
                    f"{name}: HF {mapping.hf_names} give shape {tuple(local.shape)}, model has {tuple(param.shape)}"
                )
            param.copy_(local)
    logger.info("loaded %d parameters from %s", len(maps), hf_path)
