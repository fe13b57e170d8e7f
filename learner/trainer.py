"""The learner's training loop (`longtrace learner`, one process per rank under torchrun).

    batch = data.next_batch()               rank 0 admits tasks, reads `scored`, broadcasts the batch
    metrics = learner.train_step(batch)     old logprobs, then megatron forward-backward and one optimizer step
    weight_sync.maybe_push(model)           weights to the engines as version `state.step` (learner/weight_sync);
                                            on success it advances `state.policy_version` and the broker's key
    metrics_logger.log(step, metrics)       <run_dir>/metrics.jsonl on rank 0 (before the checkpoint: see train_loop),
                                            then the trackers of --tracking.backends (learner/tracking.py)
    checkpointer.maybe_save(step)           dist checkpoint + learner state, then rank 0 acks the used entries

One step's maths on this rank is learner/train_step.py. Rank 0 owns all broker I/O; the other ranks wait in
a broadcast that rank 0 repeats every `read_block_s` while it waits for data, so every collective keeps a
short timeout and a dead rank ends the job (torchrun tears the others down) instead of hanging it.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from broker.base import SCORED, TASKS, Broker
from broker.routing import RoutingStore, routing_store
from broker.schemas import ScoredGroup, Task
from common.config import dump_config
from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)
from learner.batching import TrainBatch, batch_from_tensors, batch_to_tensors
from learner.checkpoint import Checkpointer, init_from_checkpoint, latest_checkpoint, load_checkpoint
from learner.checkpoint_catalog import init_source, run_record
from learner.metrics import MetricsLogger
from learner.model.hf_config import load_hf_arch
from learner.parallel import ParallelLayout, collective_timeout, destroy_parallel, init_parallel
from learner.prom import serve_exporter
from learner.scored_reader import CONSUMER_GROUP, ScoredReader
from learner.state import LearnerState
from learner.tracking import build_metrics_logger, check_installed
from learner.train_config import EarlyStopConfig, TrainConfig
from learner.train_step import (
    Learner,
    apply_constant_schedule,
    build_model_and_optimizer,
    build_reference_model,
)
from learner.weight_sync.base import WeightSync
from learner.weight_sync.factory import build_weight_sync
from learner.weight_sync.sources import MegatronSource

logger = logging.getLogger(__name__)


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
    """Run totals after the step. Every admitted group is trained, dropped, dead-lettered (by cause: upstream.py,
    CAUSES) or in flight (admitted, not decided yet)."""
    return {
        "policy_version": float(state.policy_version),
        "groups_admitted": float(state.cursor.admitted),
        "groups_trained": float(state.num_trained_groups),
        "groups_dropped_stale": float(state.num_dropped_stale),
        "groups_dropped_zero_variance": float(state.num_dropped_zero_variance),
        "groups_dead_lettered": float(state.num_dead_lettered),
        **{f"groups_dead_lettered/{cause}": float(n) for cause, n in sorted(state.groups_dead_lettered.items())},
        "groups_in_flight": float(len(state.admitted_unread)),
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
        t.weight_sync.push(t.learner.model)
    while state.step < t.max_steps and not state.stopped_early:
        batch = t.data.next_batch()
        metrics = t.learner.train_step(batch)
        state.step += 1
        state.num_trained_groups += len(batch.group_ids)
        state.stopped_early = t.early_stop(state.step, metrics["loss"])
        push = t.weight_sync.maybe_push(t.learner.model)  # on success: state.policy_version = state.step
        if push is None and state.stopped_early:
            push = t.weight_sync.push(t.learner.model)  # the engines and exports get the last step
        if push is not None:
            metrics |= push.metrics()
        # The line before the checkpoint: a learner killed between the two resumes from the previous checkpoint and
        # logs the step again (its line replaces this one), while a checkpoint whose step has no line would leave
        # the groups it trained out of the record (metrics.jsonl is what `bench chaos` counts from).
        t.metrics_logger.log(
            state.step,
            metrics | _counters(state) | {"stopped_early": float(state.stopped_early)},
            trained_group_ids=batch.group_ids,
            released_group_ids=batch.released_group_ids,
        )
        if not t.checkpointer.maybe_save(state.step) and state.stopped_early:
            t.checkpointer.save(state.step)
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
    init = init_source(cfg, resuming=resume is not None)  # --checkpoint.init_from: only a run's first start
    model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=resume is None and init is None)
    state = LearnerState()
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer)
        apply_constant_schedule(optimizer, cfg.optim)
    elif init is not None:
        init_from_checkpoint(init, model, optimizer, arch, with_optimizer=cfg.checkpoint.init_optimizer)
        apply_constant_schedule(optimizer, cfg.optim)  # this run's lr and weight decay, not the source run's
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
    weight_sync = build_weight_sync(cfg.weight_sync, source, broker, state)
    closers.append(weight_sync.close)
    data = BatchChannel(group, poll, cfg.batch.read_block_s, cfg.batch.batch_timeout_s)
    checkpointer = Checkpointer(
        cfg.checkpoint,
        cfg.checkpoint_dir,
        cfg.max_steps,
        model,
        optimizer,
        state,
        on_saved=on_saved,
        record=run_record(cfg, init, resume),
    )
    exporter = serve_exporter(cfg.prometheus.host, cfg.prometheus.port, is_writer=rank0)
    metrics_logger = build_metrics_logger(
        cfg.run_dir,
        is_writer=rank0,
        tracking=cfg.tracking,
        resume_step=state.step,
        extra_trackers={"prometheus": exporter} if exporter else None,
    )
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
    from learner.upstream import UpstreamReleases

    broker = connect(cfg.broker)
    broker.attach_run("learner", owner=True, resumed_from=f"checkpoint at step {state.step}" if state.step else "")
    feeder: Feeder | None = None
    if cfg.data.dataset_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
        try:  # scans every row's prompt length; a ConfigError when none fits --data.max_total_tokens
            feeder = Feeder(
                JsonlDataset(cfg.data.dataset_path),
                tokenizer,
                broker.producer(TASKS, Task),
                state,
                cfg.data,
                broker.run_id,
                max_groups=cfg.max_steps * cfg.data.groups_per_step,
            )
        except BaseException:
            broker.close()
            raise
        feeder.set_max_backlog(cfg.broker.max_backlog)
    else:
        logger.warning("no --data.dataset_path: the learner admits no tasks (something else must publish them)")
    consumer = broker.consumer(SCORED, ScoredGroup, group=CONSUMER_GROUP, name=cfg.consumer_name)
    ledger = feeder.ledger if feeder is not None else None
    routing: RoutingStore | None = None
    routing_shape = (0, 0)
    if cfg.model.routing_replay:  # the samples' routing, beside their entries (broker/routing.py)
        from transformers import AutoConfig

        from learner.model.moe import read_moe_arch

        hf = AutoConfig.from_pretrained(cfg.model.hf_path, local_files_only=True)
        arch = read_moe_arch(hf)
        if arch is None:
            broker.close()
            raise ValueError(f"--model.routing_replay: {cfg.model.hf_path} is not an MoE model")
        routing = routing_store(broker)
        routing_shape = (int(hf.num_hidden_layers), arch.topk)  # every layer is MoE (read_moe_arch checks)
    reader = ScoredReader(
        consumer, state, cfg.data, cfg.batch, cfg.loss, ledger=ledger, routing=routing, routing_shape=routing_shape
    )
    upstream = UpstreamReleases(broker, reader, cfg.batch)

    def poll(block_s: float) -> TrainBatch | None:
        upstream.poll()  # first, so that the slots it gives back are admitted again right away
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
            check_installed(cfg.tracking)  # a missing tracker package fails now, not after the model is built
        training = build_training(cfg, layout)
        logger.info("training from step %d to %d", training.state.step, cfg.max_steps)
        train_loop(training)
    except RuntimeError as e:
        step = training.state.step if training is not None else 0
        if (timeout := collective_timeout(e, cfg.model.dist_timeout_s, step, cfg.checkpoint.interval_steps)) is None:
            raise
        logger.error("%s", timeout)
        raise timeout from e
    finally:
        if training is not None:
            training.close()
        destroy_parallel()
