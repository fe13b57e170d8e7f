"""One optimizer step on this rank: the model and optimizer (`build_model_and_optimizer`), the frozen reference
model, and `Learner.train_step`.

A step is one optimizer step on `groups_per_step` groups (METHOD.md §3): old logprobs are recomputed
with the current weights (log_softmax(logits / T), the engine's convention), then the clipped GRPO
loss with icepop runs through megatron's forward_backward_func (any TP/PP/DP layout) with
`calculate_per_token_loss`, so megatron divides the gradients by the response-token count of the
global batch. The loop around it is learner/trainer.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.utils import get_model_config
from torch.profiler import record_function

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.batching import (
    REWARD_METRICS,
    Layout,
    MicroBatch,
    TrainBatch,
    build_micro_batch,
    padding_fraction,
    plan_micro_batches,
)
from learner.logprobs import head_logprobs_and_entropy, logprobs_and_entropy, token_logprobs
from learner.loss import STAT_KEYS, compute_loss, reduce_stats
from learner.model.build import build_model
from learner.model.head import enable_hidden_output, output_weight, returns_hidden
from learner.model.hf_config import HFArch, padded_vocab_size
from learner.model.load import load_hf_weights
from learner.model.moe import equal_micro_batch_counts
from learner.model.moe_layer import RoutingStats, set_replay_routing
from learner.parallel import ParallelLayout
from learner.train_config import OptimConfig, TrainConfig


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def vocab_parallel_entropy(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, from TP-sharded logits `[..., vocab / tp]` (padding rows excluded).

    H = log Z - sum_v p_v z_v with z = logits / T - max; the sums are all-reduced over TP (autograd-aware).
    """
    z = logits.float() / temperature
    shard = z.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    real = torch.arange(start, start + shard, device=z.device) < vocab_size
    z = z.masked_fill(~real, float("-inf"))
    z_max = z.detach().max(dim=-1, keepdim=True).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    z = z - z_max
    e = torch.exp(z)  # 0 on padding rows
    # z := 0 on padding rows before the product: 0 * -inf would put NaN into the backward pass
    sum_ez: torch.Tensor = reduce_from_tensor_model_parallel_region((e * z.masked_fill(~real, 0.0)).sum(dim=-1))
    sum_e: torch.Tensor = reduce_from_tensor_model_parallel_region(e.sum(dim=-1))
    return torch.log(sum_e) - sum_ez / sum_e


# ---------------------------------------------------------------- model, optimizer, one step


def apply_constant_schedule(optimizer: MegatronOptimizer, cfg: OptimConfig) -> None:
    """Constant lr, and weight decay times megatron's per-group multiplier (0 for biases and norms)."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)


def build_model_and_optimizer(
    cfg: TrainConfig, arch: HFArch, load_weights: bool
) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    """This rank's shard wrapped in megatron DDP, and megatron's Adam (distributed optimizer optional)."""
    # Always initialise, even when weights are loaded next: megatron marks TP-sharded parameters
    # (`tensor_model_parallel`) only in its init functions, and without the mark the grad norm (hence
    # clipping) counts a TP shard as a duplicate and drops it.
    model = build_model(arch, cfg.model)
    if load_weights:
        load_hf_weights(model, cfg.model.hf_path, arch)
    model.to(device())
    _set_head(model, cfg)
    config = get_model_config(model)
    # Megatron sums the loss over tokens and divides the gradients by the global token count.
    config.calculate_per_token_loss = True
    config.variable_seq_lengths = True  # dynamic micro-batches: PP stages exchange shapes
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,  # the fused head adds its weight grad to main_grad itself: no hook fires
        check_for_nan_in_grad=True,  # a NaN gradient stops the run instead of poisoning the weights
        use_distributed_optimizer=cfg.optim.distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=cfg.model.dtype == "bf16",
            params_dtype=torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32,
            use_distributed_optimizer=o.distributed_optimizer,
        ),
        [ddp],
    )
    apply_constant_schedule(optimizer, o)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp, optimizer


def _set_head(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """With `batch.logprob_impl = fused_head` the last stage returns hidden states: the output layer runs inside
    the chunked logprob pass (learner/model/head.py)."""
    if cfg.batch.logprob_impl == "fused_head" and parallel_state.is_pipeline_last_stage():
        enable_hidden_output(model)


def build_reference_model(cfg: TrainConfig, arch: HFArch) -> torch.nn.Module:
    """The frozen initial policy for the KL term (only built when kl_coef > 0)."""
    ref = build_model(arch, cfg.model)
    load_hf_weights(ref, cfg.model.hf_path, arch)
    ref.to(device())
    ref.requires_grad_(False)
    _set_head(ref, cfg)
    get_model_config(ref).variable_seq_lengths = True
    return ref


class Learner:
    """Owns the model and optimizer of this rank; `train_step` is one optimizer step on one batch."""

    def __init__(
        self,
        cfg: TrainConfig,
        arch: HFArch,
        layout: ParallelLayout,
        model: DistributedDataParallel,
        optimizer: MegatronOptimizer,
        ref_model: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.arch = arch
        self.layout = layout
        self.model = model
        self.optimizer = optimizer
        self.ref_model = ref_model
        # SFT is plain cross-entropy: temperature 1. RL uses the engines' sampling temperature.
        self.temperature = cfg.data.temperature if cfg.loss.mode == "grpo" else 1.0
        # Every CP rank holds a share of the tokens, hence of the sums: one writer per (DP, CP) rank.
        self._is_stat_writer = parallel_state.is_pipeline_last_stage() and layout.tp_rank == 0
        self.mb_layout = Layout(cfg.batch.pad_multiple, cfg.batch.packing, layout.cp_size)
        shard = (
            padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp_size) // layout.tp_size
        )
        self.chunk_rows = max(1, int(cfg.batch.logprob_chunk_mb * 2**20) // (4 * shard))
        self._cp_rank = parallel_state.get_context_parallel_rank()
        self._routing = RoutingStats(model) if arch.moe is not None else None

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        t0 = time.monotonic()
        b = self.cfg.batch
        lengths = [s.num_inputs for s in batch.samples]
        plan = plan_micro_batches(lengths, self.layout.dp_size, b.max_tokens_per_micro_batch, self.mb_layout)
        if self.layout.ep_size > 1:  # MoE layers are collectives over EP ranks: as many micro-batches on each
            plan = equal_micro_batch_counts(plan, lengths)
        mbs = [
            build_micro_batch(batch.samples, idx, self.mb_layout)
            .shard_for_cp(self.layout.cp_size, self._cp_rank)
            .to(device())
            for idx in plan[self.layout.dp_rank]
        ]
        if self.cfg.loss.mode == "grpo":
            for mb, logp in zip(mbs, self._logprobs(self.model, mbs), strict=True):
                mb.logp_old_BS = logp
            if self.ref_model is not None:
                for mb, logp in zip(mbs, self._logprobs(self.ref_model, mbs), strict=True):
                    mb.logp_ref_BS = logp
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        # Named ranges for torch.profiler (the memory bench splits its peak by them); free when not profiling.
        with record_function("forward_backward"):
            store = self._run(self.model, mbs, self._loss, forward_only=False)
        with record_function("optimizer_step"):
            update_ok, grad_norm, _ = self.optimizer.step()
        assert update_ok, "optimizer step skipped (non-finite gradients)"
        sums = self._all_reduce_stats(store)
        step_s = time.monotonic() - t0
        metrics = reduce_stats(sums) | batch.metrics
        if self.cfg.loss.mode == "sft":  # a demonstration's reward is a placeholder 1: no reward figures to report
            metrics = {k: v for k, v in metrics.items() if k not in REWARD_METRICS}
        metrics |= {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "step_s": step_s,
            "tokens_per_s": sum(lengths) / step_s,
            "num_micro_batches": float(len(mbs)),
            "padding_fraction": padding_fraction(lengths, plan, self.mb_layout),
        }
        if self._routing is not None:
            metrics |= self._routing.step_metrics(len(mbs))
        return metrics

    # -- megatron plumbing

    def _run(
        self, model: torch.nn.Module, mbs: list[MicroBatch], loss_fn: Callable[..., Any], forward_only: bool
    ) -> list[dict[str, Any]]:
        def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            mb = next(data_iterator)
            if replay:  # the engine's experts for this micro-batch's tokens (every pass: old logprobs, loss, ref)
                set_replay_routing(model, mb.routed_experts_BSLK, backward=not forward_only)
            packed = None
            if mb.cu_seqlens is not None:  # THD: megatron's attention and rotary embedding follow cu_seqlens
                longest = int(torch.diff(mb.cu_seqlens).max())
                packed = PackedSeqParams(
                    "thd", mb.cu_seqlens, mb.cu_seqlens, max_seqlen_q=longest, max_seqlen_kv=longest
                )
            output = model(mb.input_ids_BS, mb.position_ids_BS, None, packed_seq_params=packed)
            return output, partial(loss_fn, model, mb)

        replay = self.cfg.model.routing_replay and self.arch.moe is not None

        result: list[dict[str, Any]] = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=[model],
            num_microbatches=len(mbs),
            seq_length=max(mb.input_ids_BS.shape[1] for mb in mbs),
            micro_batch_size=max(mb.input_ids_BS.shape[0] for mb in mbs),
            forward_only=forward_only,
        )
        if replay:  # no stale routing for forwards outside a step
            set_replay_routing(model, None)
        return result

    @torch.no_grad()
    def _logprobs(self, model: torch.nn.Module, mbs: list[MicroBatch]) -> list[torch.Tensor | None]:
        """Per-token logprobs of every micro-batch under `model`'s current weights (on the last stage, else None)."""
        store = self._run(model, mbs, self._logprobs_only, forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return [None] * len(mbs)
        return [d["logp"] for d in store]

    def _logprobs_and_entropy(
        self, model: torch.nn.Module, mb: MicroBatch, output: torch.Tensor, entropy_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token logprobs of the labels and entropies from the last stage's `output` (logits, or hidden states
        under fused_head), by `batch.logprob_impl`; the entropy's gradient only when `entropy_grad`."""
        b = self.cfg.batch
        if returns_hidden(model):
            weight = output_weight(model)
            # Straight into megatron DDP's fp32 grad buffer (no overlap_grad_reduce here, so no hook waits on it).
            logp, entropy = head_logprobs_and_entropy(
                output, weight, mb.labels_BS, self.temperature, self.arch.vocab_size, self.chunk_rows,
                weight_grad_into=getattr(weight, "main_grad", None),
            )  # fmt: skip
            return logp, entropy if entropy_grad else entropy.detach()
        logits = output
        if b.logprob_impl == "megatron":
            logp = token_logprobs(logits, mb.labels_BS, self.temperature, self.arch.vocab_size)
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = vocab_parallel_entropy(logits, self.temperature, self.arch.vocab_size)
            return logp, entropy
        logp, entropy = logprobs_and_entropy(
            logits, mb.labels_BS, self.temperature, self.arch.vocab_size, self.chunk_rows
        )
        return logp, entropy if entropy_grad else entropy.detach()

    def _logprobs_only(
        self, model: torch.nn.Module, mb: MicroBatch, output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        logp, _ = self._logprobs_and_entropy(model, mb, output, entropy_grad=False)
        zero = torch.zeros((), device=output.device)
        return zero, mb.loss_mask_BS.sum().int(), {"logp": logp.detach()}

    def _loss(
        self, model: torch.nn.Module, mb: MicroBatch, output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        cfg = self.cfg.loss
        # The entropy's gradient only when the loss uses it.
        logp, entropy = self._logprobs_and_entropy(model, mb, output, entropy_grad=cfg.entropy_coef > 0)
        out = compute_loss(
            cfg,
            logp,
            mb.loss_mask_BS,
            logp_old_BT=mb.logp_old_BS,
            adv_BT=mb.advantages_BS,
            logp_rollout_BT=mb.rollout_logp_BS if cfg.importance_correction != "none" else None,
            logp_ref_BT=mb.logp_ref_BS,
            entropy_BT=entropy,
        )
        return out.loss_sum, out.num_tokens.int(), {"stats": out.stats}

    def _all_reduce_stats(self, store: list[dict[str, Any]]) -> dict[str, float]:
        """Statistic sums over micro-batches and data-parallel ranks (one writer per DP rank: last stage, TP 0)."""
        local = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device())
        if self._is_stat_writer:
            for d in store:
                for k, v in d["stats"].items():
                    local[STAT_KEYS.index(k)] += v.double()
        dist.all_reduce(local)
        present = self._present_stats()
        return {k: float(v) for k, v in zip(STAT_KEYS, local.tolist(), strict=True) if k in present}

    def _present_stats(self) -> set[str]:
        cfg = self.cfg.loss
        keys = {"loss_sum", "num_tokens", "entropy_sum"}
        if cfg.mode == "grpo":
            keys |= {"pg_loss_sum", "clipped_sum", "ratio_sum", "logp_old_sum"}
            if cfg.importance_correction != "none":
                keys |= {"is_ratio_sum", "is_modified_sum", "is_abs_dev_sum"}
            if cfg.kl_coef > 0:
                keys.add("kl_sum")
        return keys
