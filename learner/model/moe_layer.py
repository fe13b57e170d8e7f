"""The megatron side of Qwen3-MoE (learner/model/moe.py has the config mapping): the MoE layer the layer spec
uses, and the routing statistics of a training step.

`LearnerMoELayer` is megatron's MoELayer with two changes: its all-gather token dispatcher accepts token counts
that differ over the TP x EP group (each data-parallel rank packs its own micro-batches), and its router reads
`calculate_per_token_loss` at forward time (the trainer turns it on after the model is built).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_default_pg_collection,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)

# The name megatron's router logs its switch load-balancing loss under (moe_utils.save_to_aux_losses_tracker).
_AUX_LOSS = "load_balancing_loss"

# megatron-core 0.16 binds moe_utils.te_general_gemm only when Transformer Engine imports, but the router's gating
# linear reads it unconditionally (NameError without TE); None selects its torch.mm path.
if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None


class _PaddedAllGatherDispatcher(MoEAllGatherTokenDispatcher):  # type: ignore[misc]  # megatron is untyped
    """megatron's all-gather dispatcher for token counts that differ over the TP x EP group.

    Its all-gather and reduce-scatter need as many tokens on every rank (gloo has no uneven all-gather either):
    each rank pads its tokens to the group's largest count with rows routed to no expert (no expert computes
    them, their combined output is 0) and drops them after the combine.
    """

    routing_map: torch.Tensor  # [tokens, experts] bool, set by the parent's dispatch_preprocess
    num_local_tokens: int

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, probs = super().dispatch_preprocess(hidden_states, routing_map, probs)
        self.num_local_tokens = tokens.shape[0]
        if self.tp_size > 1 or self.ep_size > 1:  # when the parent gathers
            most = torch.tensor([self.num_local_tokens], device=tokens.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.tp_ep_group)
            pad = int(most.item()) - self.num_local_tokens
            if pad:
                tokens = torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])])
                probs = torch.cat([probs, probs.new_zeros(pad, probs.shape[1])])
                self.routing_map = torch.cat([self.routing_map, self.routing_map.new_zeros(pad, probs.shape[1])])
        return tokens, probs

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = super().combine_postprocess(hidden_states[: self.num_local_tokens])
        return out


class LearnerMoELayer(MoELayer):  # type: ignore[misc]  # megatron is untyped
    """megatron's MoELayer with the padded all-gather dispatcher (the only dispatcher moe.py configures)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MoESubmodules | None = None,
        layer_number: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config, submodules, layer_number, pg_collection)
        assert config.moe_token_dispatcher_type == "allgather", config.moe_token_dispatcher_type
        self.token_dispatcher = _PaddedAllGatherDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=self.config,
            pg_collection=pg_collection if pg_collection is not None else get_default_pg_collection(),
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # The router copies config.calculate_per_token_loss when built; build_model_and_optimizer sets it later.
        # Left False, the aux-loss gradient is not scaled up by the token count that megatron divides all by.
        router: Any = self.router
        router.calculate_per_token_loss = self.config.calculate_per_token_loss
        return super().forward(hidden_states, *args, **kwargs)


def use_learner_moe_layer(spec: ModuleSpec) -> None:
    """Make an MoE transformer-layer spec (megatron's local or TE one) build `LearnerMoELayer`."""
    mlp = spec.submodules.mlp
    assert isinstance(mlp, ModuleSpec) and mlp.module is MoELayer, mlp
    mlp.module = LearnerMoELayer


class RoutingStats:
    """Per-step routing statistics of a model's MoE layers, for the step metrics.

    Forward hooks on the routers count the tokens sent to each expert in the passes that train (router in
    training mode with gradients on, as for megatron's aux loss): the loss pass, not the old-logprob or
    reference passes. `step_metrics` reduces them over the ranks and starts the next step from zero.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        gpt = unwrap_model(model)  # the GPTModel (build.unwrap; build.py imports this module)
        moe_layers = [layer.mlp for layer in gpt.decoder.layers if isinstance(layer.mlp, MoELayer)]
        device = next(gpt.parameters()).device
        config = gpt.config
        self._counts = torch.zeros(len(moe_layers), config.num_moe_experts, dtype=torch.float64, device=device)
        self._num_layers = config.num_layers
        self._aux_loss = config.moe_aux_loss_coeff > 0
        for i, layer in enumerate(moe_layers):
            layer.router.register_forward_hook(partial(self._count, i))
        clear_aux_losses_tracker()

    def _count(self, i: int, router: torch.nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        if router.training and torch.is_grad_enabled():
            self._counts[i] += output[1].sum(dim=0)  # routing_map [tokens, experts]

    def step_metrics(self, num_micro_batches: int) -> dict[str, float]:
        """A collective over every rank: expert load extremes and the mean aux loss since the last call.

        moe_expert_load_max / _min: the largest / smallest share of a layer's routed tokens (token x top-k
        slots) that one expert received, over all MoE layers (1 / num_experts when balanced).
        moe_aux_loss: the switch load-balancing loss (without its coefficient), mean over layers and micro-batches.
        """
        # Each DP x CP rank routes its own tokens (TP ranks route copies, unless sequence-parallel, which leaves
        # the shares unchanged); layers of other pipeline stages come in through the max over PP.
        counts = self._counts.clone()
        dist.all_reduce(counts, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
        shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        extremes = torch.stack([shares.max(), -shares.min()]) if len(shares) else counts.new_full((2,), -1.0)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=parallel_state.get_pipeline_model_parallel_group())
        out = {"moe_expert_load_max": float(extremes[0]), "moe_expert_load_min": float(-extremes[1])}
        self._counts.zero_()
        if self._aux_loss:
            # Per global layer, summed over this rank's micro-batches (0 for other stages' layers); each TP x CP
            # rank holds a partial sum over its tokens (megatron's own reduction), DP ranks are averaged.
            tracker = get_moe_layer_wise_logging_tracker().get(_AUX_LOSS)
            values = counts.new_zeros(self._num_layers) if tracker is None else tracker["values"].double()
            values = values / max(num_micro_batches, 1)
            dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
            dist.all_reduce(values, group=parallel_state.get_tensor_and_context_parallel_group())
            dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
            dp_size = parallel_state.get_data_parallel_world_size()
            out["moe_aux_loss"] = float(values.sum()) / (dp_size * self._num_layers)
            clear_aux_losses_tracker()
        return out
