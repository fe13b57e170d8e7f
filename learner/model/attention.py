"""Core attention for the local (non-Transformer-Engine) layer spec through torch's fused SDPA kernels.

megatron-core's local `DotProductAttention` materialises the `[b, heads, s, s]` scores (baddbmm, masked
softmax, bmm) and repeats K/V for GQA; `torch.nn.functional.scaled_dot_product_attention` uses the
flash/memory-efficient kernels on CPU and GPU and handles GQA natively. It plugs into megatron's
`SelfAttention` as its `core_attention` submodule, with the same inputs and output layout.

It also takes what megatron hands a core attention for the two long-context layouts: packed sequences (THD,
`packed_seq_params.cu_seqlens_q`: one causal attention per sequence, never across a boundary) and context
parallelism (this rank's zig-zag share of each sequence: keys and values gathered over the CP group,
learner/context_parallel.py). A CP rank's chunk at offset o attends to keys 0 .. o + c under a causal mask aligned
bottom-right, which SDPA's `is_causal` (aligned top-left) cannot say and torch's `causal_lower_right` materialises
as a dense mask on CPU. On CPU the chunk runs as two flash attentions merged by log-sum-exp (`_OffsetCausal`: the
keys before it, all visible, and its own, top-left causal): exact, memory O(chunk). Elsewhere (CUDA without
Transformer Engine, or dropout) its queries are preceded by zeros up to the offset and the padded rows' outputs
dropped: exact, but memory and compute of a full-length attention for that chunk. Transformer Engine's ring
attention (GPU) has no such waste.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.context_parallel import all_gather_cp, restore_order

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):  # type: ignore[misc]  # megatron is untyped
    """Causal (or explicitly masked) softmax attention, this TP rank's heads only. Padded (BSHD): q `[sq, b, heads,
    d]`, k/v `[sk, b, groups, d]` in, `[sq, b, heads * d]` out; packed (THD): q `[t, heads, d]`, k/v `[t, groups,
    d]` in, `[t, heads * d]` out. Under CP, s and t count this rank's tokens (its zig-zag share)."""

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
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = pg_collection.cp if pg_collection is not None else None

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
        if attention_bias is not None:
            raise ValueError("SDPAttention supports no attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        group = self.cp_group if self.cp_group is not None else parallel_state.get_context_parallel_group()
        cp = group.size()
        if not packed and cp == 1:
            return self._padded(query, key, value, attention_mask, mask_type)
        if attention_mask is not None or mask_type != AttnMaskType.causal:
            raise ValueError("packed sequences and context parallelism take causal attention without a mask")
        if cp > 1:  # [cp, tokens, (b,) groups, d]: every rank's keys and values
            key, value = all_gather_cp(key, group), all_gather_cp(value, group)
        else:
            key, value = key.unsqueeze(0), value.unsqueeze(0)
        rank = group.rank()
        if not packed:  # one row per sequence: [s, b, h, d] -> [b, h, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, restore_order(key), restore_order(value)))
            return self._causal(q, k, v, rank, cp).permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        assert packed_seq_params is not None
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        outs, start = [], 0
        for n in (torch.diff(cu) // cp).tolist():  # this rank's tokens of each sequence, back to back
            q = query[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
            k, v = (restore_order(t[:, start : start + n]).transpose(0, 1).unsqueeze(0) for t in (key, value))
            outs.append(self._causal(q, k, v, rank, cp).squeeze(0).transpose(0, 1))
            start += n
        return torch.cat(outs).reshape(query.shape[0], -1)

    def _padded(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mask_type: AttnMaskType,
    ) -> torch.Tensor:
        # Megatron's mask marks positions to hide with True and, when given, replaces the causal mask.
        attn_mask = None if attention_mask is None else ~attention_mask
        causal = attn_mask is None and mask_type == AttnMaskType.causal
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d]
        out = self._sdpa(q, k, v, attn_mask=attn_mask, is_causal=causal)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
        """q `[b, heads, n, d]`: this rank's share of one sequence (chunks r and 2cp-1-r); k/v `[b, groups, L, d]`
        the whole sequence in order. Causal attention of each held chunk over the keys up to its end."""
        if cp == 1:
            return self._sdpa(q, k, v, is_causal=True)
        c = q.shape[2] // 2
        outs = []
        for chunk, qc in ((rank, q[:, :, :c]), (2 * cp - 1 - rank, q[:, :, c:])):
            offset = chunk * c
            if q.device.type == "cpu" and not (self.training and self.dropout_p > 0):
                end = offset + c
                args = (qc, k[:, :, :end], v[:, :, :end], offset, self.softmax_scale)
                outs.append(_OffsetCausal.apply(*args))  # type: ignore[no-untyped-call]  # torch leaves apply untyped
                continue
            if offset:  # bottom-right causal as top-left over [zeros; qc]: row offset + i sees keys <= offset + i
                qc = torch.cat([qc.new_zeros(qc.shape[0], qc.shape[1], offset, qc.shape[3]), qc], dim=2)
            end = offset + c
            outs.append(self._sdpa(qc, k[:, :, :end], v[:, :, :end], is_causal=True)[:, :, offset:])
        return torch.cat(outs, dim=2)

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads are split over TP, so dropout draws from the tensor-parallel RNG stream (as megatron's does).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:
            out: torch.Tensor = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        return out


class _OffsetCausal(torch.autograd.Function):
    """Causal attention of queries at positions `offset .. offset + c` over keys `0 .. offset + c`, exact and O(c)
    in memory (CPU, no dropout): the keys before the chunk (all visible) and the chunk's own (top-left causal, as
    the lengths are equal) are two flash attentions merged by their log-sum-exps. The backward runs each block's
    flash backward against the merged output and log-sum-exp, whose per-block gradients then add up exactly (the
    way ring attention splits its backward)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
        out, lse = _flash_cpu(q, k[:, :, offset:], v[:, :, offset:], True, scale)
        if offset:
            out_prefix, lse_prefix = _flash_cpu(q, k[:, :, :offset], v[:, :, :offset], False, scale)
            merged = torch.logaddexp(lse_prefix, lse)
            out = out_prefix * (lse_prefix - merged).exp().unsqueeze(-1) + out * (lse - merged).exp().unsqueeze(-1)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.offset, ctx.scale = offset, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        offset, scale = ctx.offset, ctx.scale
        grad = grad.contiguous()
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq, dk, dv = backward(grad, q, k[:, :, offset:], v[:, :, offset:], out, lse, 0.0, True, scale=scale)
        if offset:
            dq_prefix, dk_prefix, dv_prefix = backward(
                grad, q, k[:, :, :offset], v[:, :, :offset], out, lse, 0.0, False, scale=scale
            )
            dq, dk, dv = dq + dq_prefix, torch.cat([dk_prefix, dk], 2), torch.cat([dv_prefix, dv], 2)
        return dq, dk, dv, None, None


def _flash_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash attention with its log-sum-exp `[b, heads, s]` (GQA: fewer key heads are fine)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return out, lse
