"""Learner memory per GPU: model states + activations + the logprob head, for the recipes' layouts (docs/deploy.md).

Model states follow megatron's accounting: bf16 weights (2 B), fp32 gradient buffers (`grad_reduce_in_fp32`: 4 B)
and fp32 master weights with Adam's two moments (12 B) sharded over DP by the distributed optimizer.

Activations under full recompute (the new path): every layer keeps its input (`[tokens, h]`, split over TP by
sequence parallelism; under PP for up to pp micro-batches in flight, 1F1B) and one layer at a time is recomputed and back-propagated, whose working set is
`WORKING_SET_FACTOR` x the elements of the tensors one layer saves for its backward (`layer_elements`), split over
TP. The factor is fitted by `longtrace bench learner-memory` on CPU (the slope of its new path's activation tensor
bytes where a recomputed layer, not the fixed logprob chunks, sets the peak; kept inputs and head subtracted): it
is the one measured number in the model. Tokens per rank: a micro-batch holds at
least one whole sequence, split over CP.

The vocabulary's share: at most two fp32 `[rows, vocab / tp]` logprob chunks (`batch.logprob_chunk_mb` each; the
fused head adds the output weight's gradient straight into the fp32 grad buffer, counted in the model states) and
the embedding's dense gradient `[vocab / tp, h]` in the weights' dtype (its backward's output, before megatron adds
it to the buffer); plus the last stage's hidden states and their gradient, fp32, per token.
"""

from __future__ import annotations

from dataclasses import dataclass

WORKING_SET_FACTOR = 1.99
"""One layer's recompute + backward working set / the elements it saves: the new path's activation tensor bytes
between its two longest lengths in docs/results/learner_memory.json (16K -> 32K: 40.8 KB per token, less the kept
inputs and the head's hidden states, over `layer_elements` x 4 B)."""


@dataclass(frozen=True)
class Dims:
    """A dense decoder's shapes (HF config names)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: float  # total parameters


def layer_elements(d: Dims) -> int:
    """Per token: the tensors one transformer layer saves for its backward (norm outputs, QKV before and after RoPE,
    attention output and o_proj input, residual, SwiGLU's gate/up and product)."""
    qkv = (d.heads + 2 * d.kv_heads) * d.head_dim
    attn = d.heads * d.head_dim
    return 3 * d.hidden + 2 * qkv + 2 * attn + 3 * d.ffn


def activation_bytes_per_token(d: Dims, tp: int, pp: int, sp: bool, dtype_bytes: int, factor: float) -> float:
    """Bytes per token held on one rank of the stage with the most layers, full recompute."""
    # 1F1B: the first stage holds the kept inputs of up to pp micro-batches in flight
    kept = pp * -(-d.layers // pp) * d.hidden * dtype_bytes / (tp if sp else 1)
    working = factor * layer_elements(d) * dtype_bytes / tp
    head = 2 * d.hidden * 4  # the last stage's hidden states and their gradient, fp32
    return kept + working + head


def per_gpu_gb(
    d: Dims, tp: int, pp: int, cp: int, dp: int, seq_tokens: int, chunk_mb: float, factor: float = WORKING_SET_FACTOR
) -> dict[str, float]:
    """GB per GPU for a bf16 run with the distributed optimizer and one sequence of `seq_tokens` per micro-batch."""
    shard = d.params / (tp * pp)
    states = shard * (2 + 4 + 12 / dp)
    tokens = seq_tokens / cp
    activations = tokens * activation_bytes_per_token(d, tp, pp, sp=tp > 1, dtype_bytes=2, factor=factor)
    head = 2 * chunk_mb * 2**20 + d.vocab / tp * d.hidden * 2  # two fp32 chunks; the bf16 embedding gradient
    gb = 1e9
    return {
        "model_states_gb": round(states / gb, 1),
        "activations_gb": round(activations / gb, 1),
        "head_gb": round(head / gb, 1),
        "total_gb": round((states + activations + head) / gb, 1),
    }
