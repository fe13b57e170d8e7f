"""Build this rank's megatron-core GPTModel (its TP shard of its pipeline stage) from an `HFArch`."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import unwrap_model

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.config import LearnerModelConfig
from learner.model.attention import SDPAttention
from learner.model.hf_config import HFArch, padded_vocab_size, transformer_config
from learner.model.moe_layer import use_learner_moe_layer
from learner.model.rope import rope_inv_freq

logger = logging.getLogger(__name__)


def layer_spec(arch: HFArch, cfg: LearnerModelConfig) -> ModuleSpec:
    """The transformer layer: megatron-core's own modules ("local", runs anywhere) or Transformer Engine's.

    An MoE model's MLP is megatron's MoE layer with one SequentialMLP expert per expert (no grouped GEMM).
    """
    experts = arch.moe.num_experts if arch.moe is not None else None
    if cfg.transformer_impl == "transformer_engine":
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError("--model.transformer_impl transformer_engine needs the transformer_engine package (GPU)")
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm, normalization="RMSNorm"
        )
        if cfg.core_attention == "sdpa":
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if experts is not None:
        use_learner_moe_layer(spec)
    return spec


def build_model(arch: HFArch, cfg: LearnerModelConfig) -> torch.nn.Module:
    """This rank's GPTModel on the current device; wrapped in Float16Module when cfg.dtype is bf16.

    Megatron's random init always runs, even when every weight is loaded afterwards (load.py): it is
    the only place that marks sharded parameters `tensor_model_parallel`, and without the mark grad-norm
    and clipping at TP > 1 silently miss those shards. Needs `learner.parallel.init_parallel` first. Returns logits sharded over TP (parallel_output)
    because the vocab-parallel log-softmax in logprobs.py never gathers the vocab.
    """
    config = transformer_config(arch, cfg)
    config.perform_initialization = True
    model: torch.nn.Module = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, cfg),
        vocab_size=padded_vocab_size(arch.vocab_size, cfg.make_vocab_size_divisible_by, cfg.tp_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,  # annotated int in megatron, used as a float base
    )
    if arch.rope_scaling is not None:
        # megatron's GPT RotaryEmbedding knows plain (and Llama-3) RoPE only, and its YaRN class is meant for MLA
        # (GPTModel drops its attention factor): keep the module, give it the scaled frequencies. YaRN's attention
        # factor is in the softmax scale (hf_config.rope_softmax_scale). Every pipeline stage has a rotary_pos_emb.
        rotary: Any = model.rotary_pos_emb
        inv_freq = rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
    if torch.cuda.is_available():
        # Parallel linears allocate on the current device, but norms are created on the CPU; megatron's own
        # get_model moves the module the same way (seen on an H100: a CPU RMSNorm weight in a CUDA forward).
        model.cuda(torch.cuda.current_device())
    if config.bf16:
        wrapped: torch.nn.Module = Float16Module(config, model)
        return wrapped
    return model


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    inner = unwrap_model(model)
    assert isinstance(inner, GPTModel), type(inner)
    return inner
