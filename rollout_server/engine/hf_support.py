"""What the built-in engine accepts from a Hugging Face config (model types, RoPE types read as SGLang reads them)
and how Qwen3-MoE expert weights are named. Weight updates name tensors as an HF checkpoint does (SGLang's loader,
the learner's export): transformers >= 5 holds a Qwen3-MoE layer's experts as two fused 3-D parameters
(`mlp.experts.gate_up_proj` [E, 2I, H], gate rows then up rows, and `mlp.experts.down_proj` [E, H, I]); the
per-expert names `mlp.experts.{e}.{gate,up,down}_proj.weight` are served as views of their slices
(model_runner.py `weight_targets`), the fused names as themselves.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen3", "llama", "qwen2", "qwen3_moe")
# RoPE types whose frequencies transformers fixes at load (dynamic and longrope change with each forward's length,
# which the KV cache cannot follow) and computes as SGLang does (YaRN's attention factor aside: yarn_attention_factor).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# YaRN keys SGLang and transformers read differently: transformers' attention_factor replaces the attention factor
# (SGLang ignores it), SGLang's extrapolation_factor scales the extrapolated frequencies (transformers ignores it).
_AMBIGUOUS_YARN_KEYS = ("attention_factor", "extrapolation_factor")
SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
EXPERT_NAME = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def expert_parts(params: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    """Fused expert parameters (`...mlp.experts.gate_up_proj` [E, 2I, H], `...mlp.experts.down_proj` [E, H, I])
    -> the per-expert checkpoint names of their slices. Any other expert layout is refused: per-expert updates
    would be written to the wrong slices."""
    parts: dict[str, list[str]] = {}
    for name in params:
        if not name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            continue
        prefix, _, last = name.rpartition(".")
        gate_up = params.get(f"{prefix}.gate_up_proj")
        down = params.get(f"{prefix}.down_proj")
        if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
            raise ValueError(f"{prefix}: expected 3-D gate_up_proj and down_proj expert parameters")
        experts, rows, hidden = gate_up.shape
        if rows % 2 or tuple(down.shape) != (experts, hidden, rows // 2):
            raise ValueError(
                f"{prefix}: unsupported expert layout gate_up_proj {list(gate_up.shape)}, down_proj "
                f"{list(down.shape)} (expected [E, 2I, H] and [E, H, I])"
            )
        projs = ("down",) if last == "down_proj" else ("gate", "up")
        parts[name] = [f"{prefix}.{e}.{proj}_proj.weight" for e in range(experts) for proj in projs]
    return parts


def check_supported(hf_config: Any) -> None:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by the built-in engine ({SUPPORTED_MODEL_TYPES})")
    if getattr(hf_config, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(hf_config, "layer_types", None) or []
    ):
        raise ValueError("sliding-window attention is not supported by the built-in engine")
    rope = rope_parameters(hf_config)
    rope_type = rope["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by the built-in engine (supported: {SUPPORTED_ROPE_TYPES})"
        )
    ambiguous = [key for key in _AMBIGUOUS_YARN_KEYS if rope_type == "yarn" and key in rope]
    if ambiguous:
        raise ValueError(f"rope_type 'yarn': {ambiguous} are read differently by SGLang and transformers")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The config's RoPE dict (transformers >= 5: `rope_parameters`, before: `rope_scaling`), rope_type filled in."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def yarn_attention_factor(rope: dict[str, Any]) -> float:
    """SGLang's YaRN `mscale`, the factor on cos and sin. transformers drops `attn_factor` (DeepSeek-R1-0528-Qwen3-8B
    sets it to 1 / mscale(4), making the product 1 under SGLang, 1.1386 under transformers) and takes the
    mscale ratio only when neither mscale is 0; SGLang is the engine the learner must match."""
    factor = float(rope["factor"])

    def get_mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale is not None and mscale_all_dim is not None:
        return get_mscale(float(mscale)) / get_mscale(float(mscale_all_dim)) * float(rope.get("attn_factor", 1.0))
    return get_mscale(1.0) * float(rope.get("attn_factor", 1.0))
