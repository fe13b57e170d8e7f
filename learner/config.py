"""The learner's typed config. `LearnerModelConfig` (the `model` section) says which HF checkpoint to
train and how to shard it; the training-loop issue adds its own sections next to it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config import BaseConfig


class LearnerModelConfig(BaseConfig):
    hf_path: str = ""
    """Hugging Face model directory (config.json + safetensors) the megatron model is built from and loaded with."""
    tp_size: int = Field(default=1, ge=1)
    """Tensor-parallel size: attention heads, MLP and vocab are split over this many ranks."""
    pp_size: int = Field(default=1, ge=1)
    """Pipeline-parallel size: transformer layers are split into this many consecutive stages."""
    cp_size: int = Field(default=1, ge=1)
    """Context-parallel size: each sequence split over this many ranks in 2 x cp_size zig-zag chunks
    (learner/context_parallel.py), keys and values exchanged in attention. The local layers need
    `core_attention = "sdpa"`; with Transformer Engine, TE's own CP attention runs."""
    ep_size: int = Field(default=1, ge=1)
    """Expert-parallel size (MoE models): each layer's experts split over this many ranks, carved out of the
    data-parallel (x CP) ranks; must divide num_experts and world size / (tp_size * pp_size)."""
    moe_aux_loss_coeff: float | None = Field(default=None, ge=0)
    """MoE load-balancing (switch) loss coefficient per layer; None: the HF config's router_aux_loss_coef. 0: off."""
    routing_replay: bool = False
    """Rollout routing replay (R3, MoE models): the routers' top-k choice in the learner's forwards is the experts the
    engine chose for each token (TrainSample.routed_experts), the weights still the learner's router softmax over
    them (learner/model/moe_layer.py). Tokens without engine routing are routed by the learner as usual."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism over the TP group (norm/dropout activations split); needs Transformer Engine."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation: megatron-core's own modules (any device) or Transformer Engine's fused ones (GPU)."""
    core_attention: Literal["sdpa", "megatron"] = "sdpa"
    """Attention kernel of the local layers: torch SDPA (fused, GQA-native) or megatron's unfused DotProductAttention."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter and compute dtype; bf16 wraps the model in megatron's Float16Module (the optimizer keeps fp32 masters)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute in the backward pass (megatron's `recompute_granularity`): none keeps every layer's
    activations; selective recomputes the core attention only (`recompute_modules = ["core_attn"]`: the
    [heads, seq, seq] scores of the unfused kernel; SDPA keeps none anyway); full keeps only each recomputed
    layer's input and runs the layer again (`recompute_method`, `recompute_num_layers`). Gradients are the same."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """Full recompute: `uniform` groups the layers into chunks of `recompute_num_layers` and keeps each chunk's
    input; `block` recomputes the first `recompute_num_layers` layers of each pipeline stage and keeps the rest."""
    recompute_num_layers: int = Field(default=1, ge=1)
    """Full recompute: layers per recomputed chunk (uniform) or recomputed layers per stage (block)."""
    seed: int = 1234
    """Seed of the default and tensor-parallel RNGs (megatron's model_parallel_cuda_manual_seed)."""
    make_vocab_size_divisible_by: int = Field(default=128, ge=1)
    """The embedding and output rows are padded to a multiple of this times tp_size (padded logits are masked)."""
    dist_timeout_s: float = Field(default=1200.0, gt=0)
    """Timeout of every collective of the learner process groups (init, TP/PP/DP traffic, weight export). With
    distributed weight sync it must exceed one push attempt's worst case (890 s with the defaults: TrainConfig
    checks, naming the flags)."""

    @model_validator(mode="after")
    def _check_parallelism(self) -> LearnerModelConfig:
        if self.sequence_parallel and self.transformer_impl != "transformer_engine":
            raise ValueError("--model.sequence_parallel needs --model.transformer_impl transformer_engine (GPU only)")
        if self.cp_size > 1 and self.transformer_impl == "local" and self.core_attention != "sdpa":
            raise ValueError("--model.cp_size > 1 with local layers needs --model.core_attention sdpa")
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError("--model.sequence_parallel needs --model.tp_size > 1")
        return self


class LearnerConfig(BaseConfig):
    """The learner process's config; the training-loop issue adds its sections (optimizer, batch, ...)."""

    model: LearnerModelConfig = Field(default_factory=LearnerModelConfig)
    """The megatron model: which HF checkpoint, its parallel layout and dtype (`--model.tp_size 2`, ...)."""
