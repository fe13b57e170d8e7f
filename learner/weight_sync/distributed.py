"""The `distributed` backend: the learner broadcasts HF-named buckets to the engines over NCCL (gloo on CPU),
through SGLang's `/update_weights_from_distributed`, the way slime does.

One transfer (a collective over the learner's ranks; the coordinator is global rank 0; the push around it, with
the policy version and the failure count, is the base class's, base.py):
 1. (with `export_dir`) every rank writes the HF export late engines load (disk.py).
 2. Coordinator: list the engines (registry + static URLs), pause them (`pause_mode`, default abort: the
    rollout workers resubmit the partial outputs), flush their KV caches (retried while they answer 400), and
    open their weight-update sessions (`/begin_weight_update`: SGLang 0.5.23 refuses the buckets outside one).
 3. Stage by stage (pipeline parallelism: each stage's leader, its TP/CP/DP rank 0, owns one group
    `<prefix>_pp<stage>_g<n>` with every engine and sends that stage's parameters; the stage's other ranks
    take part in the TP gathers of the export iterator; stages take turns so an engine serves one group at a
    time): rebuild the group when the engine set changed, then for each bucket of <= `bucket_mb` post the
    update to every engine without waiting, broadcast, await the replies.
 4. Coordinator: on a failed attempt, drop the engines that are dead or refused, rebuild with the survivors
    and send everything again (`push_retry`), so no survivor keeps a partial update. Then name the new
    version on the updated engines (`/end_weight_update`, then `/update_weight_version` with abort_all_requests
    false) and continue generation on them.
Engines in a known state after a failure: dead ones are dropped (the group is rebuilt without them at the
next push); engines that never received a tensor are resumed with their previous weights and version (those
paused before the failure, and every engine when no bucket's broadcast began in any attempt: a group that could
not be built, e.g. at an address the engines cannot reach); engines left with a partial update after the last attempt stay paused (they must not serve mixed weights)
and are retried at the next push.
An engine that dies mid-broadcast costs one attempt, never rank 0: the order of the group's, the broadcast's and
the NCCL watchdog's timeouts that guarantees it is in group.py's docstring (and docs/reliability.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from broker.base import Broker
from common.retry import RetryPolicy
from learner.state import LearnerState
from learner.weight_sync.base import Transfer, WeightSync
from learner.weight_sync.config import DistributedSyncConfig
from learner.weight_sync.disk import write_export
from learner.weight_sync.fleet import Fleet, control_client
from learner.weight_sync.group import EngineRef, GroupFailed, StageGroup
from learner.weight_sync.sources import WeightSource

logger = logging.getLogger(__name__)


def iter_buckets(named: Iterator[tuple[str, torch.Tensor]], cap_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into buckets of at most `cap_bytes`; a larger tensor forms a bucket alone."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > cap_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass
class StageResult:
    """What one stage leader did in one attempt."""

    stage: int
    bytes: int = 0
    buckets: int = 0
    transfer_s: float = 0.0
    rebuilt: bool = False
    sent: bool = False  # a bucket's broadcast began: an engine may hold part of it (parameters are written in place)
    error: str = ""
    culprits: dict[str, str] = field(default_factory=dict)


@dataclass
class _Attempt:
    """The coordinator's verdict after an attempt: retry with `engines`, or stop."""

    retry: bool
    engines: list[EngineRef]
    untouched: list[EngineRef] = field(default_factory=list)  # given up on before any tensor was sent to them


class DistributedWeightSync(WeightSync):
    def __init__(
        self,
        cfg: DistributedSyncConfig,
        source: WeightSource,
        broker: Broker | None = None,
        state: LearnerState | None = None,
    ) -> None:
        """Construct on every learner rank; `broker` is used on the coordinator only (may be None: static URLs)."""
        super().__init__(source, state, broker, cfg.every_k_steps, cfg.max_consecutive_failures)
        self.cfg = cfg
        if cfg.broadcast_timeout_s < cfg.init_timeout_s:  # NCCL builds its communicator in the first broadcast
            logger.warning(
                "weight sync: --weight_sync.broadcast_timeout_s %gs is shorter than --weight_sync.init_timeout_s %gs: "
                "the first bucket also connects the NCCL communicator and may be given up on",
                cfg.broadcast_timeout_s,
                cfg.init_timeout_s,
            )
        talks = source.is_coordinator or source.is_stage_leader
        self.client = control_client(cfg) if talks else None
        self.fleet = Fleet(cfg, self.client, broker) if source.is_coordinator and self.client else None
        self.group = StageGroup(cfg, self.client, source.pp_rank) if source.is_stage_leader and self.client else None
        self._sent = False  # this push: did any stage begin a bucket's broadcast (coordinator, from the results)

    # ------------------------------------------------------------------ the transfer (every rank)

    def _transfer(self, policy_version: int, model: Any) -> Transfer:
        t = Transfer()
        if self.cfg.export_dir:
            t.exported_to = str(
                write_export(self.source, model, self.cfg.export_dir, policy_version, self.cfg.export_keep_last)
            )
        intact: list[EngineRef] = []  # paused or failed before any tensor was sent: resume as they are
        t_pause = time.monotonic()
        engines = self._prepare(t, intact) if self.fleet is not None else []
        engines = self.source.broadcast_object(engines)
        updated: list[EngineRef] = []
        untouched: list[EngineRef] = []
        retry = self.cfg.push_retry.policy()
        self._sent = False
        while engines:
            t.attempts += 1
            result = self._send_stages(engines, model)
            results = [r for r in self.source.gather_object(result) if r is not None]
            verdict = self._judge(t, engines, results, retry, t_pause) if self.fleet is not None else None
            verdict = self.source.broadcast_object(verdict)
            if not verdict.retry:
                updated, untouched = verdict.engines, verdict.untouched
                break
            engines = verdict.engines
        if self.fleet is not None:
            self._finish(t, policy_version, updated, intact, t_pause, untouched)
        return t

    # ------------------------------------------------------------------ coordinator steps

    def _prepare(self, t: Transfer, intact: list[EngineRef]) -> list[EngineRef]:
        """Discover, pause and flush; return the engines ready to receive."""
        assert self.fleet is not None
        engines, t.failed = self.fleet.discover()
        t.num_engines = len(engines)
        if not engines:
            logger.warning("weight sync: no live engines; nothing pushed")
            return []
        errors = self.fleet.pause(engines)
        errors |= self.fleet.flush([e for e in engines if e.url not in errors])
        errors |= self.fleet.begin([e for e in engines if e.url not in errors])
        for url, why in errors.items():
            t.failed[url] = f"not updated (pause/flush/begin failed, previous weights kept): {why}"
        intact.extend(e for e in engines if e.url in errors)
        return [e for e in engines if e.url not in errors]

    def _judge(
        self, t: Transfer, engines: list[EngineRef], results: list[StageResult], retry: RetryPolicy, t_start: float
    ) -> _Attempt:
        assert self.fleet is not None
        t.bytes += sum(r.bytes for r in results)
        t.buckets += sum(r.buckets for r in results)
        t.transfer_s += sum(r.transfer_s for r in results)
        t.group_rebuilds += sum(r.rebuilt for r in results)
        self._sent = self._sent or any(r.sent for r in results)
        failed = [r for r in results if r.error]
        if not failed:
            return _Attempt(retry=False, engines=engines)
        culprits: dict[str, str] = {}
        for r in failed:
            logger.warning("weight sync attempt %d, stage %d failed: %s", t.attempts, r.stage, r.error)
            culprits |= r.culprits
        alive = self.fleet.healthy(list(culprits))
        for url, why in culprits.items():
            if url in alive:
                t.failed[url] = f"refused the update (left paused with a partial update): {why}"
            else:
                t.failed[url] = f"dead (dropped until it is live again): {why}"
                self.fleet.forget(url)
        survivors = [e for e in engines if e.url not in culprits]
        if not culprits:  # a broadcast failed or timed out with nobody to blame: retry the healthy ones
            healthy = self.fleet.healthy([e.url for e in engines])
            survivors = [e for e in engines if e.url in healthy]
            for e in engines:
                if e.url not in healthy:
                    t.failed[e.url] = f"dead (dropped until it is live again): {failed[0].error}"
        wait_s = retry.backoff_s(t.attempts)
        if survivors and t.attempts < retry.max_attempts and time.monotonic() - t_start + wait_s <= retry.deadline_s:
            time.sleep(wait_s)
            return _Attempt(retry=True, engines=survivors)
        if not self._sent:
            # No bucket's broadcast ever began (the group was never built: an address the engines cannot reach, a
            # rendezvous timeout): every live engine still holds its previous weights whole, so it generates on.
            alive_now = [e for e in engines if e.url in culprits and e.url in alive] + survivors
            for e in alive_now:
                t.failed[e.url] = (
                    f"not updated after {t.attempts} attempts, nothing was sent (previous weights kept, resumed): "
                    f"{failed[0].error}"
                )
            return _Attempt(retry=False, engines=[], untouched=alive_now)
        for e in survivors:
            t.failed[e.url] = f"update incomplete after {t.attempts} attempts (left paused): {failed[0].error}"
        return _Attempt(retry=False, engines=[])

    def _finish(
        self,
        t: Transfer,
        policy_version: int,
        updated: list[EngineRef],
        intact: list[EngineRef],
        t_pause: float,
        untouched: Sequence[EngineRef] = (),
    ) -> None:
        """Name the new version on the updated engines, resume them and the intact ones; close the session of the
        untouched ones (nothing was sent to them) and resume them with their previous weights and version."""
        assert self.fleet is not None
        closed = self.fleet.end(untouched)
        for url, why in closed.items():
            t.failed[url] = f"nothing was sent, but the update session was not closed (left paused): {why}"
        intact = [*intact, *(e for e in untouched if e.url not in closed)]
        errors = self.fleet.end(updated)
        errors |= self.fleet.set_version([e for e in updated if e.url not in errors], policy_version)
        for url, why in errors.items():
            t.failed[url] = f"weights updated but the session or version was not closed (left paused): {why}"
        ready = [e for e in updated if e.url not in errors]
        t.failed |= {url: f"resume failed: {why}" for url, why in self.fleet.resume(ready + intact).items()}
        t.pause_to_continue_s = time.monotonic() - t_pause if t.num_engines else 0.0
        t.updated = [e.url for e in ready]

    # ------------------------------------------------------------------ stages (every rank)

    def _send_stages(self, engines: list[EngineRef], model: Any) -> StageResult | None:
        """Stages take turns; on each stage its leader sends and its other ranks join the TP gathers."""
        result = None
        for stage in range(self.source.pp_size):
            if stage == self.source.pp_rank:
                if self.group is not None:
                    result = self._send_stage(self.group, engines, model)
                else:
                    for _ in self.source.named_tensors(model):
                        pass
            if self.source.pp_size > 1:
                self.source.barrier()
        return result

    def _send_stage(self, group: StageGroup, engines: list[EngineRef], model: Any) -> StageResult:
        res = StageResult(stage=group.stage)
        tensors = self.source.named_tensors(model)
        try:
            if not group.matches(engines):
                res.rebuilt = True
                group.build(engines)
            t0 = time.monotonic()
            # No flush with the buckets: the caches were flushed after the pause and nothing ran since.
            for bucket in iter_buckets(tensors, self.cfg.bucket_mb * 2**20):
                res.sent = True
                group.send_bucket(bucket, flush_cache=False)
                res.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                res.buckets += 1
            res.transfer_s = time.monotonic() - t0
        except GroupFailed as e:
            res.error, res.culprits = str(e), e.culprits
            for _ in tensors:  # the stage's other ranks are still gathering: finish the iterator with them
                pass
        return res

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        if self.client is not None:
            self.client.close()
