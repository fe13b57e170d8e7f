"""Core attention for the local (non-Transformer-Engine) layer spec through torch's fused SDPA kernels.

megatron-core's local `DotProductAttention` materialises the `[b, heads, s, s]` scores (baddbmm, masked
softmax, bmm) and repeats K/V for GQA; `torch.nn.functional.scaled_dot_product_attention` uses the
flash/memory-efficient kernels on CPU and GPU and handles GQA natively. It plugs into megatron's
`SelfAttention` as its `core_attention` submodule, with the same inputs and output layout.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):  # type: ignore[misc]  # megatron is untyped
    """Causal (or explicitly masked) softmax attention: q `[sq, b, heads, d]`, k/v `[sk, b, groups, d]` in,
    `[sq, b, heads * d]` out, this TP rank's heads only."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention has no context parallelism: use --model.transformer_impl transformer_engine")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # Megatron's mask marks positions to hide with True and, when given, replaces the causal mask.
        attn_mask = None if attention_mask is None else ~attention_mask
        causal = attn_mask is None and mask_type == AttnMaskType.causal
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d]
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads are split over TP, so dropout draws from the tensor-parallel RNG stream (as megatron's does).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
