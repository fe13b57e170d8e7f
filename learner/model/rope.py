"""RoPE scaling of a HF config (`rope_parameters` / `rope_scaling`): what the learner supports, and the rotary
frequencies and attention factor its megatron model needs for it.

The learner must reproduce the logprobs of the rollout engine, which is SGLang (vLLM computes the same), so where
transformers and SGLang read a config differently this follows SGLang:

- YaRN's `attn_factor` multiplies the attention factor in SGLang and vLLM; transformers ignores the key (it only
  logs "Unrecognized keys"). DeepSeek-R1-0528-Qwen3-8B ships attn_factor 0.8782 = 1 / mscale(factor 4): SGLang
  scales cos/sin by 1.0, transformers by 1.1386.
- YaRN's `attention_factor` (transformers' spelling) replaces the factor in transformers and is ignored by SGLang;
  `extrapolation_factor` is SGLang's only. Both are refused: no single reading is right.
- `dynamic` NTK: transformers recomputes the frequencies from each forward's length, so a KV-cached engine and a
  whole-sequence learner disagree, and SGLang fixes them for the longest length instead. Refused.

Imports no megatron: `HFArch` (hf_config.py) carries a `RopeScaling` and the pure-tensor convert.py imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "yarn")
_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_KEYS = {
    "default": _COMMON_KEYS,
    "linear": _COMMON_KEYS | {"factor"},
    "yarn": _COMMON_KEYS
    | {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    | {"attn_factor", "truncate"},
}
_WHY_NOT = {
    "dynamic": "transformers recomputes dynamic-NTK frequencies per forward length, SGLang fixes them; they disagree",
    "attention_factor": "transformers applies it and SGLang ignores it",
    "extrapolation_factor": "only SGLang reads it, transformers does not",
}


@dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE (`rope_type` linear or yarn; plain RoPE is no RopeScaling), with the YaRN defaults."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int = 0
    """YaRN: the pre-training context, from which the interpolated/extrapolated dimensions are chosen."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attn_factor: float = 1.0
    truncate: bool = True


def read_rope_scaling(params: Mapping[str, Any], max_position_embeddings: int) -> RopeScaling | None:
    """The scaling a HF rope dict asks for (None for plain RoPE); ValueError naming what is not supported."""
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in _KEYS:
        why = f" ({_WHY_NOT[rope_type]})" if rope_type in _WHY_NOT else ""
        raise ValueError(f"rope_type {rope_type!r} is not supported{why}; supported: {', '.join(ROPE_TYPES)}")
    unknown = sorted(set(params) - _KEYS[rope_type])
    if unknown:
        why = "; ".join(f"{key}: {_WHY_NOT[key]}" for key in unknown if key in _WHY_NOT)
        raise ValueError(f"rope_type {rope_type!r}: unsupported keys {unknown}" + (f" ({why})" if why else ""))
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"rope_type {rope_type!r}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return None
    if params.get("factor") is None:
        raise ValueError(f"rope_type {rope_type!r} needs a 'factor'")
    factor = float(params["factor"])
    if rope_type == "linear":
        return RopeScaling("linear", factor)
    # Both engines default an absent original context to max_position_embeddings, and beta/truncate as here.
    return RopeScaling(
        "yarn",
        factor,
        original_max_position_embeddings=int(params.get("original_max_position_embeddings") or max_position_embeddings),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=None if params.get("mscale") is None else float(params["mscale"]),
        mscale_all_dim=None if params.get("mscale_all_dim") is None else float(params["mscale_all_dim"]),
        attn_factor=float(params.get("attn_factor", 1.0)),
        truncate=bool(params.get("truncate", True)),
    )


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """The `dim // 2` float32 rotary inverse frequencies, computed in the same operations as transformers."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    if scaling is None:
        return 1.0 / pos_freqs
    if scaling.rope_type == "linear":
        return (1.0 / pos_freqs) / scaling.factor
    # YaRN: high-frequency dimensions (many turns within the original context) keep their frequency, low-frequency
    # ones are interpolated by `factor`, with a linear ramp between the two correction dimensions.
    original = scaling.original_max_position_embeddings
    low, high = (
        dim * math.log(original / (r * 2 * math.pi)) / (2 * math.log(theta))
        for r in (scaling.beta_fast, scaling.beta_slow)
    )
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers and SGLang: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (scaling.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor YaRN multiplies cos and sin by (SGLang's `mscale`, `attn_factor` included); 1 otherwise."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0

    factor = scaling.factor

    def get_mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.mscale is not None and scaling.mscale_all_dim is not None:
        return get_mscale(scaling.mscale) / get_mscale(scaling.mscale_all_dim) * scaling.attn_factor
    return get_mscale(1.0) * scaling.attn_factor
