"""The learner's training loop (`longtrace learner`, one process per rank under torchrun).

    batch = data.next_batch()               rank 0 admits tasks, reads `scored`, broadcasts the batch
    metrics = learner.train_step(batch)     old logprobs, then megatron forward-backward and one optimizer step
    weight_sync.maybe_push(step, model)     weights to the engines (learner/weight_sync); type none: version key := step
    checkpointer.maybe_save(step)           dist checkpoint + learner state, then rank 0 acks the used entries
    metrics_logger.log(step, metrics)       <run_dir>/metrics.jsonl on rank 0

A step is one optimizer step on `groups_per_step` groups (METHOD.md §3): old logprobs are recomputed
with the current weights (log_softmax(logits / T), the engine's convention), then the clipped GRPO
loss with icepop runs through megatron's forward_backward_func (any TP/PP/DP layout) with
`calculate_per_token_loss`, so megatron divides the gradients by the response-token count of the
global batch. Rank 0 owns all broker I/O; the other ranks wait in a broadcast that rank 0 repeats
every `read_block_s` while it waits for data, so every collective keeps a short timeout and a dead
rank ends the job (torchrun tears the others down) instead of hanging it.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.utils import get_model_config

from broker.base import SCORED, TASKS, Broker
from broker.schemas import ScoredGroup, Task
from common.config import dump_config
from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.batching import (
    CONSUMER_GROUP,
    MicroBatch,
    ScoredReader,
    TrainBatch,
    batch_from_tensors,
    batch_to_tensors,
    build_micro_batch,
    plan_micro_batches,
)
from learner.checkpoint import Checkpointer, latest_checkpoint, load_checkpoint
from learner.logprobs import token_logprobs
from learner.loss import STAT_KEYS, compute_loss, reduce_stats
from learner.metrics import MetricsLogger, build_metrics_logger
from learner.model.build import build_model
from learner.model.hf_config import HFArch, load_hf_arch
from learner.model.load import load_hf_weights
from learner.parallel import ParallelLayout, destroy_parallel, init_parallel
from learner.state import LearnerState
from learner.train_config import EarlyStopConfig, OptimConfig, TrainConfig
from learner.weight_sync.base import WeightSync
from learner.weight_sync.factory import build_weight_sync
from learner.weight_sync.sources import MegatronSource

logger = logging.getLogger(__name__)


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
    config = get_model_config(model)
    # Megatron sums the loss over tokens and divides the gradients by the global token count.
    config.calculate_per_token_loss = True
    config.variable_seq_lengths = True  # dynamic micro-batches: PP stages exchange shapes
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
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


def build_reference_model(cfg: TrainConfig, arch: HFArch) -> torch.nn.Module:
    """The frozen initial policy for the KL term (only built when kl_coef > 0)."""
    ref = build_model(arch, cfg.model)
    load_hf_weights(ref, cfg.model.hf_path, arch)
    ref.to(device())
    ref.requires_grad_(False)
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
        self._is_stat_writer = (
            parallel_state.is_pipeline_last_stage()
            and layout.tp_rank == 0
            and parallel_state.get_context_parallel_rank() == 0
        )

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        t0 = time.monotonic()
        b = self.cfg.batch
        lengths = [s.num_inputs for s in batch.samples]
        plan = plan_micro_batches(lengths, self.layout.dp_size, b.max_tokens_per_micro_batch, b.pad_multiple)
        mbs = [build_micro_batch(batch.samples, idx, b.pad_multiple).to(device()) for idx in plan[self.layout.dp_rank]]
        if self.cfg.loss.mode == "grpo":
            for mb, logp in zip(mbs, self._logprobs(self.model, mbs), strict=True):
                mb.logp_old_BS = logp
            if self.ref_model is not None:
                for mb, logp in zip(mbs, self._logprobs(self.ref_model, mbs), strict=True):
                    mb.logp_ref_BS = logp
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = self._run(self.model, mbs, self._loss, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        assert update_ok, "optimizer step skipped (non-finite gradients)"
        sums = self._all_reduce_stats(store)
        step_s = time.monotonic() - t0
        metrics = reduce_stats(sums) | batch.metrics
        metrics |= {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "step_s": step_s,
            "tokens_per_s": sum(lengths) / step_s,
            "num_micro_batches": float(len(mbs)),
        }
        return metrics

    # -- megatron plumbing

    def _run(
        self, model: torch.nn.Module, mbs: list[MicroBatch], loss_fn: Callable[..., Any], forward_only: bool
    ) -> list[dict[str, Any]]:
        def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            mb = next(data_iterator)
            return model(mb.input_ids_BS, mb.position_ids_BS, None), partial(loss_fn, mb)

        result: list[dict[str, Any]] = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=[model],
            num_microbatches=len(mbs),
            seq_length=max(mb.input_ids_BS.shape[1] for mb in mbs),
            micro_batch_size=max(mb.input_ids_BS.shape[0] for mb in mbs),
            forward_only=forward_only,
        )
        return result

    @torch.no_grad()
    def _logprobs(self, model: torch.nn.Module, mbs: list[MicroBatch]) -> list[torch.Tensor | None]:
        """Per-token logprobs of every micro-batch under `model`'s current weights (on the last stage, else None)."""
        store = self._run(model, mbs, self._logprobs_only, forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return [None] * len(mbs)
        return [d["logp"] for d in store]

    def _logprobs_only(self, mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        logp = token_logprobs(logits, mb.labels_BS, self.temperature, self.arch.vocab_size)
        zero = torch.zeros((), device=logits.device)
        return zero, mb.loss_mask_BS.sum().int(), {"logp": logp.detach()}

    def _loss(self, mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        cfg = self.cfg.loss
        logp = token_logprobs(logits, mb.labels_BS, self.temperature, self.arch.vocab_size)
        with torch.set_grad_enabled(cfg.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy = vocab_parallel_entropy(logits, self.temperature, self.arch.vocab_size)
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


# ---------------------------------------------------------------- data: rank 0 reads, everyone receives


class BatchChannel:
    """Rank 0 polls its source and broadcasts either "still waiting" or the batch; the other ranks receive."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        poll: Callable[[float], TrainBatch | None] | None,
        block_s: float,
        timeout_s: float,
    ) -> None:
        assert (poll is not None) == (dist.get_rank() == 0), "exactly rank 0 has the data source"
        self._group = group
        self._poll = poll
        self._block_s = block_s
        self._timeout_s = timeout_s

    def next_batch(self) -> TrainBatch:
        if self._poll is None:
            return self._receive()
        deadline = time.monotonic() + self._timeout_s
        while (batch := self._poll(self._block_s)) is None:
            if time.monotonic() > deadline:
                reason = f"no complete batch within {self._timeout_s:.0f}s (--batch.batch_timeout_s)"
                self._send_header({"kind": "error", "reason": reason})
                raise TimeoutError(reason)
            self._send_header({"kind": "wait"})
        meta, tensors = batch_to_tensors(batch)
        self._send_header({"kind": "batch", "meta": meta})
        for name in sorted(tensors):
            dist.broadcast(tensors[name], src=0, group=self._group)
        return batch

    def _send_header(self, header: dict[str, Any]) -> None:
        dist.broadcast_object_list([header], src=0, group=self._group)

    def _receive(self) -> TrainBatch:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=self._group)
            header = box[0]
            if header["kind"] == "wait":
                continue
            if header["kind"] == "error":
                raise RuntimeError(f"rank 0 gave up: {header['reason']}")
            meta = header["meta"]
            tensors = {}
            for name in sorted(meta["shapes"]):
                shape, dtype = meta["shapes"][name]
                tensors[name] = torch.empty(shape, dtype=dtype)
                dist.broadcast(tensors[name], src=0, group=self._group)
            return batch_from_tensors(meta, tensors)


# ---------------------------------------------------------------- assembly and the loop


@dataclass
class Training:
    state: LearnerState
    data: BatchChannel
    learner: Learner
    weight_sync: WeightSync
    checkpointer: Checkpointer
    metrics_logger: MetricsLogger
    max_steps: int
    early_stop: EarlyStop
    close: Callable[[], None]


def _counters(state: LearnerState) -> dict[str, float]:
    return {
        "policy_version": float(state.policy_version),
        "groups_admitted": float(state.cursor.admitted),
        "groups_trained": float(state.num_trained_groups),
        "groups_dropped_stale": float(state.num_dropped_stale),
        "groups_dropped_zero_variance": float(state.num_dropped_zero_variance),
        "groups_dead_lettered": float(state.num_dead_lettered),
        "groups_duplicate": float(state.num_duplicates),
        "epoch": float(state.cursor.epoch),
    }


class EarlyStop:
    """Decides on rank 0 whether training ends before max_steps (EarlyStopConfig) and tells every rank, so all of
    them leave the loop after the same step (a rank that trained on alone would hang in its next collective)."""

    def __init__(self, cfg: EarlyStopConfig, group: Any) -> None:
        self.cfg = cfg
        self._group = group
        self._losses: deque[float] = deque(maxlen=cfg.window_steps)

    def __call__(self, step: int, loss: float) -> bool:
        if self.cfg.loss_below <= 0:
            return False
        self._losses.append(loss)
        full = len(self._losses) == self.cfg.window_steps
        hit = full and step >= self.cfg.min_steps and sum(self._losses) / len(self._losses) < self.cfg.loss_below
        if self._group is None:
            return hit
        flag = torch.tensor([1 if hit else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self._group)
        return bool(flag.item())


def train_loop(t: Training) -> None:
    state = t.state
    if state.step > 0:
        # Resumed: the engines may hold weights the checkpoint never saw (a push after it, then the crash), or
        # weights older than it; push the checkpoint's now so generation and training agree again.
        state.policy_version = t.weight_sync.push(state.step, t.learner.model).version
    while state.step < t.max_steps and not state.stopped_early:
        batch = t.data.next_batch()
        metrics = t.learner.train_step(batch)
        state.step += 1
        state.num_trained_groups += len(batch.group_ids)
        state.stopped_early = t.early_stop(state.step, metrics["loss"])
        push = t.weight_sync.maybe_push(state.step, t.learner.model)
        if push is None and state.stopped_early:
            push = t.weight_sync.push(state.step, t.learner.model)  # the engines and exports get the last step
        if push is not None:
            state.policy_version = push.version
            metrics |= push.metrics()
        if not t.checkpointer.maybe_save(state.step) and state.stopped_early:
            t.checkpointer.save(state.step)
        t.metrics_logger.log(state.step, metrics | _counters(state) | {"stopped_early": float(state.stopped_early)})
    if state.stopped_early:
        logger.info(
            "stopped early after step %d of %d: mean loss below %s",
            state.step,
            t.max_steps,
            t.early_stop.cfg.loss_below,
        )


def build_training(cfg: TrainConfig, layout: ParallelLayout) -> Training:
    """Model, optimizer, resumed state and (rank 0) the broker-side components."""
    rank0 = layout.rank == 0
    if torch.cuda.is_available() and cfg.model.dtype == "fp32":
        logger.warning("training in fp32 on GPU; the recipe trains in bf16 (--model.dtype bf16)")
    arch = load_hf_arch(cfg.model.hf_path)
    resume = latest_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint.resume else None
    model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=resume is None)
    state = LearnerState()
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer)
        apply_constant_schedule(optimizer, cfg.optim)
    ref_model = build_reference_model(cfg, arch) if cfg.loss.kl_coef > 0 else None
    learner = Learner(cfg, arch, layout, model, optimizer, ref_model)

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.model.dist_timeout_s))
    closers: list[Callable[[], None]] = []
    broker: Broker | None = None
    if rank0:
        broker, reader, poll = _build_rank0_data(cfg, state)
        closers.append(broker.close)
        on_saved: Callable[[], object] = reader.ack_held
    else:
        poll, on_saved = None, lambda: None
    source = MegatronSource(arch, cfg.model.hf_path, timeout_s=cfg.model.dist_timeout_s)
    weight_sync = build_weight_sync(cfg.weight_sync, source, broker, initial_version=state.policy_version)
    closers.append(weight_sync.close)
    data = BatchChannel(group, poll, cfg.batch.read_block_s, cfg.batch.batch_timeout_s)
    checkpointer = Checkpointer(
        cfg.checkpoint, cfg.checkpoint_dir, cfg.max_steps, model, optimizer, state, on_saved=on_saved
    )
    metrics_logger = build_metrics_logger(cfg.run_dir, is_writer=rank0)
    closers.append(metrics_logger.close)
    return Training(
        state=state,
        data=data,
        learner=learner,
        weight_sync=weight_sync,
        checkpointer=checkpointer,
        metrics_logger=metrics_logger,
        max_steps=cfg.max_steps,
        early_stop=EarlyStop(cfg.early_stop, group),
        close=partial(_close_all, closers),
    )


def _close_all(closers: list[Callable[[], None]]) -> None:
    for close in reversed(closers):  # the reverse of creation: weight sync before the broker it may use
        close()


def _build_rank0_data(
    cfg: TrainConfig, state: LearnerState
) -> tuple[Broker, ScoredReader, Callable[[float], TrainBatch | None]]:
    from broker.factory import connect
    from datagen.prompts import JsonlDataset
    from learner.feeder import Feeder

    broker = connect(cfg.broker)
    consumer = broker.consumer(SCORED, ScoredGroup, group=CONSUMER_GROUP, name=cfg.consumer_name)
    reader = ScoredReader(consumer, state, cfg.data, cfg.batch, cfg.loss)
    feeder: Feeder | None = None
    if cfg.data.dataset_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
        feeder = Feeder(
            JsonlDataset(cfg.data.dataset_path),
            tokenizer,
            broker.producer(TASKS, Task),
            state,
            cfg.data,
            broker.run_id,
            max_groups=cfg.max_steps * cfg.data.groups_per_step,
        )
        feeder.set_max_backlog(cfg.broker.max_backlog)
    else:
        logger.warning("no --data.dataset_path: the learner admits no tasks (something else must publish them)")

    def poll(block_s: float) -> TrainBatch | None:
        if feeder is not None:
            feeder.fill()
        return reader.poll(block_s)

    return broker, reader, poll


def run(cfg: TrainConfig) -> None:
    """Train under torchrun (or as a single process); raise on any error after tearing the process groups down."""
    layout = init_parallel(cfg.model)
    training: Training | None = None
    try:
        if layout.rank == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            dump_config(cfg, Path(cfg.run_dir) / "config.json")
        training = build_training(cfg, layout)
        logger.info("training from step %d to %d", training.state.step, cfg.max_steps)
        train_loop(training)
    finally:
        if training is not None:
            training.close()
        destroy_parallel()
