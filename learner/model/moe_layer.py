"""The megatron side of Qwen3-MoE (learner/model/moe.py has the config mapping): the MoE layer the layer spec
uses, and the routing statistics of a training step.

`LearnerMoELayer` is megatron's MoELayer with two changes: its all-gather token dispatcher accepts token counts
that differ over the TP x EP group (each data-parallel rank packs its own micro-batches), and its router reads
`calculate_per_token_loss` at forward time (the trainer turns it on after the model is built).

Rollout routing replay (`--model.routing_replay`, R3): megatron-core 0.16's router already takes a replay object
(`moe_enable_routing_replay`: a `RouterReplay` whose top-k is called inside `topk_routing_with_score_function`, with
the scores, softmax or not, gathered at the given indices and the probabilities computed from them as usual, so the
router keeps its gradients). Its replay is all tokens or none; `TokenRouterReplay` replaces it per router with a
per-token one (engine ids where given, the router's own top-k elsewhere: padding, samples without routing), and
`set_replay_routing` hands each MoE layer its column of a micro-batch's `[rows, tokens, layers, topk]` ids before
the forward (learner/train_step.py). Under full activation recompute a router's first (no-grad) run queues the
routing it used and the backward's re-run takes it back in order, megatron's replay_backward_list: with pipeline
parallelism 1F1B runs later micro-batches' forwards before an earlier one's backward.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_default_pg_collection,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router_replay import RouterReplay
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


class TokenRouterReplay(RouterReplay):  # type: ignore[misc]  # megatron is untyped
    """A router's replay slot: `target_topk_idx` [tokens, topk] expert ids in the router's token order (-1 rows: the
    router's own choice), or None (no replay). Not registered in megatron's global instance list."""

    def __init__(self) -> None:  # RouterReplay.__init__ would append self to its global list
        self.target_topk_idx: torch.Tensor | None = None
        self.recorded_topk_idx = None
        self.router_replay_action = None
        self.replay_backward_list: list[torch.Tensor | None] = []
        self.queue_for_recompute = False
        # In the passes that train (gradients on): [tokens routed, tokens replayed, replayed tokens whose engine
        # experts differ from the router's own top-k as a set]. RoutingStats reads and resets it each step.
        self.counts = torch.zeros(3, dtype=torch.float64)

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None = None,
        group_topk: int | None = None,
        default_compute_topk: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        target = self.target_topk_idx
        if is_checkpointing():  # full recompute: the backward re-runs this forward after 1F1B moved on
            if torch.is_grad_enabled():  # the re-run: the routing its first run used, in micro-batch order
                assert self.replay_backward_list, "a recomputed router found no routing saved by its forward"
                target = self.replay_backward_list.pop(0)
            elif self.queue_for_recompute:  # not in forward-only passes: no backward will take it back
                self.replay_backward_list.append(target)
        if target is None:
            return values, indices
        assert target.shape == indices.shape, f"replayed routing {tuple(target.shape)} for {tuple(indices.shape)}"
        target = target.to(device=indices.device, dtype=indices.dtype)
        given = (target >= 0).all(dim=1, keepdim=True)
        if torch.is_grad_enabled():
            changed = given.squeeze(1) & (target.sort(dim=1).values != indices.sort(dim=1).values).any(dim=1)
            step = torch.stack([torch.ones_like(changed).sum(), given.sum(), changed.sum()]).double()
            self.counts = self.counts.to(step.device) + step  # no host sync on GPU
        indices = torch.where(given, target, indices)
        return scores.gather(1, indices), indices


def set_replay_routing(model: torch.nn.Module, routed_BSLK: torch.Tensor | None, *, backward: bool = False) -> None:
    """Give every MoE layer of `model` (this pipeline stage's) its replayed experts for the next forward: the ids of
    global layer l are `routed_BSLK[:, :, l]` ([rows, tokens, topk], -1 where none); None clears replay.
    `backward`: a backward pass follows this forward (recomputed layers must find the same routing)."""
    gpt = unwrap_model(model)
    config = gpt.config
    flat = None
    if routed_BSLK is not None:
        # The router sees hidden states [tokens, rows, hidden] flattened token-major; sequence parallelism gives
        # each TP rank a contiguous chunk of the tokens.
        flat = routed_BSLK.transpose(0, 1).reshape(-1, *routed_BSLK.shape[2:])
        if config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            flat = flat.chunk(tp)[parallel_state.get_tensor_model_parallel_rank()]
    for layer in gpt.decoder.layers:
        replay = getattr(getattr(layer.mlp, "router", None), "router_replay", None)
        if isinstance(replay, TokenRouterReplay):
            replay.target_topk_idx = None if flat is None else flat[:, layer.layer_number - 1]
            replay.queue_for_recompute = backward
            if routed_BSLK is None:
                assert not replay.replay_backward_list, "routing saved for a recompute that never ran"


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
        router: Any = self.router
        if router.router_replay is not None:  # moe_enable_routing_replay: the per-token kind, off the global list
            RouterReplay.global_router_replay_instances.remove(router.router_replay)
            router.router_replay = TokenRouterReplay()

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
        replays = [getattr(layer.router, "router_replay", None) for layer in moe_layers]
        self._replays = [r for r in replays if isinstance(r, TokenRouterReplay)]
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
        With routing replay: moe_replayed_fraction, the share of routed tokens whose experts came from the engine
        (the rest are padding or samples without routing), and moe_replay_changed_fraction, the share of those
        whose engine experts differ from the learner's own top-k (train/inference routing drift).
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
        if self._replays:
            replay = torch.stack([r.counts.to(counts.device) for r in self._replays]).sum(dim=0)
            # Over this stage's layers and the ranks as for the loads (TP copies cancel in the ratios), then stages.
            group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(replay, group=group)
            dist.all_reduce(replay, group=parallel_state.get_pipeline_model_parallel_group())
            out["moe_replayed_fraction"] = float(replay[1] / replay[0].clamp(min=1))
            out["moe_replay_changed_fraction"] = float(replay[2] / replay[1].clamp(min=1))
            for r in self._replays:
                r.counts.zero_()
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
