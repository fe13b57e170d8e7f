"""Hugging Face config -> megatron-core TransformerConfig for the Qwen3, Qwen3-MoE and Llama families.

`HFArch` is the architecture read (and validated) from a HF `config.json`; everything downstream
(model build, weight mapping, export) works from it, never from the raw HF config. Qwen3 is
Llama plus per-head RMSNorm on q and k (qk-layernorm) and an explicit head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from learner.config import LearnerModelConfig
from learner.model.moe import MoEArch, check_moe_fit, moe_config_kwargs, read_moe_arch
from learner.model.rope import RopeScaling, read_rope_scaling, rope_attention_factor

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import PretrainedConfig

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "llama")


@dataclass(frozen=True)
class HFArch:
    """The architecture of a HF causal LM, in the terms megatron needs."""

    model_type: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    init_std: float
    rope_scaling: RopeScaling | None = None
    """Scaled RoPE (YaRN, linear; learner/model/rope.py); None for plain RoPE."""
    moe: MoEArch | None = None
    """The routed experts of every layer (Qwen3-MoE; learner/model/moe.py); None for a dense MLP."""


def _rope(hf: PretrainedConfig) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; older configs in rope_theta/rope_scaling.
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    try:
        scaling = read_rope_scaling(params, hf.max_position_embeddings)
    except ValueError as e:
        raise ValueError(f"{hf.model_type}: {e}") from None
    return float(theta), scaling


def rope_softmax_scale(arch: HFArch) -> float | None:
    """The attention softmax scale when YaRN's attention factor m applies, else None (megatron's 1/sqrt(d)).

    The engines scale cos and sin by m, hence every q.k by m^2; megatron applies RoPE without m outside MLA (its
    YaRN class returns m and GPTModel drops it), so m^2 goes into the softmax scale, as megatron's MLA does.
    """
    m = rope_attention_factor(arch.rope_scaling)
    return None if m == 1.0 else m * m / math.sqrt(arch.head_dim)


def read_hf_arch(hf: PretrainedConfig) -> HFArch:
    """Validate a transformers PretrainedConfig and extract its architecture; ValueError if unsupported."""
    model_type = hf.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    theta, rope_scaling = _rope(hf)
    if hf.hidden_act != "silu":
        raise ValueError(f"{model_type}: hidden_act {hf.hidden_act!r} is not supported, only silu (SwiGLU)")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError(f"{model_type}: linear biases (attention_bias/mlp_bias) are not supported")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError(f"{model_type}: sliding-window attention is not supported")
    num_heads = hf.num_attention_heads
    num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    return HFArch(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
        norm_eps=hf.rms_norm_eps,
        rope_theta=theta,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        init_std=getattr(hf, "initializer_range", 0.02),
        rope_scaling=rope_scaling,
        moe=read_moe_arch(hf),
    )


def load_hf_arch(hf_path: str | Path) -> HFArch:
    """Read `config.json` of a local HF model directory (no hub access)."""
    from transformers import AutoConfig

    return read_hf_arch(AutoConfig.from_pretrained(str(hf_path), local_files_only=True))


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Rows of the megatron embedding/output layer: vocab rounded up so every TP shard is equal and aligned."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def check_parallel_fit(arch: HFArch, cfg: LearnerModelConfig) -> None:
    """Raise ValueError (naming the flag) when the model cannot be split as configured."""
    if arch.num_kv_heads % cfg.tp_size:
        raise ValueError(f"--model.tp_size {cfg.tp_size} must divide num_key_value_heads {arch.num_kv_heads}")
    if arch.moe is None and arch.ffn_hidden_size % cfg.tp_size:
        raise ValueError(f"--model.tp_size {cfg.tp_size} must divide intermediate_size {arch.ffn_hidden_size}")
    if arch.num_layers % cfg.pp_size:
        raise ValueError(f"--model.pp_size {cfg.pp_size} must divide num_hidden_layers {arch.num_layers}")
    check_moe_fit(arch.moe, cfg)


def transformer_config(arch: HFArch, cfg: LearnerModelConfig) -> TransformerConfig:
    """The megatron TransformerConfig equivalent to `arch`, sharded as `cfg` says.

    Dropout is off (RL fine-tuning of these models uses none, and logprobs must match the engine).
    Fused CUDA kernels (softmax, RoPE, bias-activation) stay off so the same config runs everywhere.
    """
    # Imported here so that HFArch (used by the pure-tensor convert.py) loads without megatron.
    from megatron.core.transformer.transformer_config import TransformerConfig

    from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)

    check_parallel_fit(arch, cfg)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    recompute: dict[str, Any] = {}
    if cfg.recompute == "selective":
        recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif cfg.recompute == "full":
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": cfg.recompute_method,
            "recompute_num_layers": cfg.recompute_num_layers,
        }
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        softmax_scale=rope_softmax_scale(arch),
        init_method_std=arch.init_std,
        tensor_model_parallel_size=cfg.tp_size,
        pipeline_model_parallel_size=cfg.pp_size,
        context_parallel_size=cfg.cp_size,
        sequence_parallel=cfg.sequence_parallel,
        transformer_impl=cfg.transformer_impl,
        bf16=cfg.dtype == "bf16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        **recompute,
        **moe_config_kwargs(arch.moe, cfg),
    )
