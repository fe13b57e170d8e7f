"""Qwen3-MoE on megatron-core's MoE layers: the architecture read from a HF config, the TransformerConfig fields
it maps to, and the micro-batch plan that expert parallelism needs. Imports no megatron (convert.py and
hf_config.py use it); the megatron modules are in moe_layer.py.

Qwen3-MoE's router is softmax over all experts, top-k, then (norm_topk_prob) a renormalisation over the k chosen.
Renormalised softmax probabilities of the top k equal a softmax over the top-k logits, which is megatron's
`moe_router_pre_softmax=False`; without renormalisation it is `moe_router_pre_softmax=True` (softmax, then top-k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from learner.config import LearnerModelConfig

MOE_MODEL_TYPES = ("qwen3_moe",)


@dataclass(frozen=True)
class MoEArch:
    """The routed-experts MLP of every layer of a HF MoE model."""

    num_experts: int
    topk: int
    ffn_hidden_size: int
    """Intermediate size of one expert (HF `moe_intermediate_size`)."""
    norm_topk_prob: bool
    aux_loss_coef: float
    """HF `router_aux_loss_coef`: the default load-balancing loss coefficient (`--model.moe_aux_loss_coeff`)."""


def read_moe_arch(hf: PretrainedConfig) -> MoEArch | None:
    """The MoE part of a HF config (None for a dense model); ValueError, naming the field, for MoE layouts that
    megatron's MoE layer cannot reproduce exactly."""
    if hf.model_type not in MOE_MODEL_TYPES:
        return None
    name = hf.model_type
    if getattr(hf, "mlp_only_layers", None):
        raise ValueError(
            f"{name}: mlp_only_layers {hf.mlp_only_layers} (dense layers among MoE layers) is not supported"
        )
    if getattr(hf, "decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"{name}: decoder_sparse_step {hf.decoder_sparse_step} is not supported, only 1 (every layer MoE)"
        )
    if getattr(hf, "shared_expert_intermediate_size", 0):
        raise ValueError(f"{name}: shared experts (shared_expert_intermediate_size) are not supported")
    num_experts, topk = int(hf.num_experts), int(hf.num_experts_per_tok)
    if not 1 <= topk <= num_experts:
        raise ValueError(f"{name}: num_experts_per_tok {topk} must be in [1, num_experts {num_experts}]")
    norm = bool(hf.norm_topk_prob)
    if topk == 1 and norm:
        # Every token's single expert weighs 1; megatron refuses top-1 without pre-softmax (zero router gradient).
        raise ValueError(f"{name}: num_experts_per_tok 1 with norm_topk_prob is not supported")
    return MoEArch(
        num_experts=num_experts,
        topk=topk,
        ffn_hidden_size=int(hf.moe_intermediate_size),
        norm_topk_prob=norm,
        aux_loss_coef=float(getattr(hf, "router_aux_loss_coef", 0.0)),
    )


def check_moe_fit(moe: MoEArch | None, cfg: LearnerModelConfig) -> None:
    """Raise ValueError (naming the flag) when the experts cannot be split as configured."""
    if moe is None:
        if cfg.ep_size > 1:
            raise ValueError(f"--model.ep_size {cfg.ep_size} needs an MoE model (this one is dense)")
        return
    if moe.num_experts % cfg.ep_size:
        raise ValueError(f"--model.ep_size {cfg.ep_size} must divide num_experts {moe.num_experts}")
    if moe.ffn_hidden_size % cfg.tp_size:
        raise ValueError(f"--model.tp_size {cfg.tp_size} must divide moe_intermediate_size {moe.ffn_hidden_size}")


def moe_config_kwargs(moe: MoEArch | None, cfg: LearnerModelConfig) -> dict[str, Any]:
    """TransformerConfig fields of the MoE layers (only the expert-parallel size for a dense model)."""
    if moe is None:
        return {"expert_model_parallel_size": cfg.ep_size}
    coeff = moe.aux_loss_coef if cfg.moe_aux_loss_coeff is None else cfg.moe_aux_loss_coeff
    return {
        "num_moe_experts": moe.num_experts,
        "moe_ffn_hidden_size": moe.ffn_hidden_size,
        "moe_router_topk": moe.topk,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not moe.norm_topk_prob,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": coeff,
        # The all-gather dispatcher runs on gloo (all_gather_into_tensor / reduce_scatter_tensor); megatron's
        # all-to-all one allocates a CUDA stream when built. moe_layer.py pads it for uneven token counts.
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": False,  # SequentialMLP: one MLP per expert, plain torch, names match convert.py
        "expert_model_parallel_size": cfg.ep_size,
        # Routing replay: each router gets a replay slot (moe_layer.py swaps in its per-token kind).
        "moe_enable_routing_replay": cfg.routing_replay,
    }


def equal_micro_batch_counts(plan: list[list[list[int]]], lengths: Sequence[int]) -> list[list[list[int]]]:
    """`plan` (from batching.plan_micro_batches) with the same number of micro-batches on every data-parallel rank.

    With expert parallelism each MoE layer's forward and backward is a collective over the EP ranks, which
    belong to different DP ranks: every rank must run as many micro-batches. Ranks with fewer split their
    largest micro-batch (halves stay within the token budget); only when a rank has fewer sequences than
    another rank's count do the ranks above merge their two smallest micro-batches (over the budget).
    """
    tokens = lambda mb: sum(lengths[i] for i in mb)  # noqa: E731
    target = min(max(len(rank) for rank in plan), min(sum(len(mb) for mb in rank) for rank in plan))
    out = []
    for rank in plan:
        mbs = [list(mb) for mb in rank]
        while len(mbs) > target:
            mbs.sort(key=tokens)
            mbs = [mbs[0] + mbs[1], *mbs[2:]]
        while len(mbs) < target:
            big = max((mb for mb in mbs if len(mb) > 1), key=tokens)
            mbs.remove(big)
            ordered = sorted(big, key=lambda i: (-lengths[i], i))
            mbs += [ordered[0::2], ordered[1::2]]
        out.append(mbs)
    return out
