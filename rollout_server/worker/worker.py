"""The rollout worker's main loop: read tasks -> generate groups concurrently -> publish to `rollouts` -> ack.

At most `max_groups_in_flight` groups are generated at once; a task is read only when a slot is free, so
nothing sits unstarted in this worker while others idle. A group is published (dedup key = group id, so a
redelivered task is never published twice) only once all its samples have ended, and the task is acked only
after that publish. Broker calls are blocking, so they run in threads (asyncio.to_thread).

Every task read leaves this worker one way: published and acked, or dead-lettered with its reason. A task the
engines reject (4xx) or that cannot be planned goes to `dead` at once; one whose samples fail (engines down) is
generated again with backoff (`[task_retry]`), then goes to `dead`; a group too large to publish
(`EntryTooLarge`, `--broker.max_entry_mb`) goes to `dead` with its size. The leases on the tasks held are renewed
long before they run out (the consumer's reads, `touch` while all slots are busy or while draining), so no other
worker generates them too.

On SIGTERM the worker stops reading, lets in-flight groups finish for `shutdown_timeout_s`, then cancels the
rest: their tasks stay unacked and another worker reclaims them after the broker's `claim_idle_s`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from broker.base import (
    ROLLOUTS,
    TASKS,
    BackpressureTimeout,
    Broker,
    BrokerError,
    Consumer,
    Entry,
    EntryTooLarge,
    Producer,
)
from broker.routing import RoutingStore, encode_routing, routing_store
from broker.schemas import Group, Task
from common.retry import RetryPolicy
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.generation import SampleFailed, SampleGenerator, SampleRejected, TaskRejected
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.processors import get_processor
from rollout_server.worker.router import Router, build_router

log = logging.getLogger(__name__)


def _group_key(group: Group) -> str:
    return group.group_id


class RolloutWorker:
    def __init__(
        self, cfg: RolloutConfig, broker: Broker, router: Router, metrics: RolloutMetrics, worker_id: str = ""
    ) -> None:
        self.cfg = cfg
        self.worker_id = worker_id or cfg.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self._broker = broker
        self._router = router
        self._metrics = metrics
        self._generator = SampleGenerator(cfg, router, get_processor(cfg.processor), metrics)
        self._task_retry: RetryPolicy = cfg.task_retry.policy()
        # How often the loop renews its leases while not reading: the consumer renews every claim_idle_s / 4.
        self._renew_s = min(1.0, cfg.broker.claim_idle_s / 4)
        self._stopping = False
        self._routing: RoutingStore | None = routing_store(broker) if cfg.sampling.routing_replay else None

    async def run(self, stop: asyncio.Event) -> None:
        """Process tasks until `stop` is set, then drain; re-raise if a group handler or the router dies."""
        consumer = self._broker.consumer(TASKS, Task, self.cfg.consumer_group, self.worker_id)
        producer = self._broker.producer(ROLLOUTS, Group)
        running: dict[str, asyncio.Task[None]] = {}  # task entry id -> its handler
        log.info("rollout worker %s reading %s", self.worker_id, TASKS)
        while not stop.is_set():
            self._router.raise_if_stopped()
            _raise_if_failed(running)
            free = self.cfg.max_groups_in_flight - len(running)
            if free <= 0:  # not reading, so renew the lease on the tasks being generated
                await asyncio.to_thread(consumer.touch)
                await asyncio.wait(running.values(), timeout=self._renew_s, return_when=asyncio.FIRST_COMPLETED)
                continue
            entries = await asyncio.to_thread(consumer.read, free, self.cfg.broker.block_s)
            for entry in entries:
                if entry.id in running:
                    continue  # our own in-flight entry, re-claimed after claim_idle_s: it is being handled
                handler = asyncio.create_task(self._handle(consumer, producer, entry), name=entry.msg.group_id)
                running[entry.id] = handler
                handler.add_done_callback(functools.partial(_forget, running, entry.id))
        await self._drain(consumer, running)
        log.info("rollout worker %s stopped", self.worker_id)

    async def _handle(self, consumer: Consumer[Task], producer: Producer[Group], entry: Entry[Task]) -> None:
        """Generate, publish and ack one task, or dead-letter it with the reason; never leave it held."""
        m = self._metrics
        m.in_flight_groups.inc()
        started = time.monotonic()
        try:
            try:
                group, routing = await self._generate(entry.msg)
            except (TaskRejected, SampleRejected, _GaveUp) as e:
                await self._dead_letter(consumer, entry, str(e))
                return
            routing_keys = await self._store_routing(group, routing)
            try:
                published = await self._publish(producer, group)
            except EntryTooLarge as e:  # retrying cannot shrink it: a crash here would loop on redelivery
                await self._drop_routing(routing_keys)
                await self._dead_letter(consumer, entry, f"its group of {len(group.samples)} samples is too large: {e}")
                return
            if published != "published":  # a duplicate refers to the first generation's keys; none to any
                await self._drop_routing(routing_keys)
            if published:
                await asyncio.to_thread(consumer.ack, [entry.id])
                log.info("group %s done in %.2fs", entry.msg.group_id, time.monotonic() - started)
        finally:
            m.in_flight_groups.dec()

    async def _store_routing(self, group: Group, routing: list[bytes | None]) -> list[str]:
        """With routing replay: store each sample's routing under a key of its own and name it in the sample, before
        the group is published (a reader never finds an entry whose routing is still being written)."""
        if self._routing is None:
            return []
        store = self._routing
        keys = store.new_keys(group.group_id, len(group.samples))
        values = {}
        for sample, key, value in zip(group.samples, keys, routing, strict=True):
            assert value is not None, "generation checks that every sample has its routing"
            values[key] = encode_routing(value)
            sample.routing_key = key
        await asyncio.to_thread(store.put, values, self.cfg.sampling.routing_ttl_s)
        return keys

    async def _drop_routing(self, keys: list[str]) -> None:
        """Delete the routing of a generation no entry refers to (best effort: the TTL reaps what this misses)."""
        if keys and self._routing is not None:
            try:
                await asyncio.to_thread(self._routing.delete, keys)
            except BrokerError as e:
                log.warning("could not delete %d unpublished routing keys (left to their TTL): %s", len(keys), e)

    async def _generate(self, task: Task) -> tuple[Group, list[bytes | None]]:
        """The task's group, generated again with backoff (`[task_retry]`) while its samples fail; _GaveUp after
        the last attempt. A task left unacked instead stayed held by this live worker (its lease renewed) and was
        never retried nor given up on."""
        attempts = 0

        async def attempt() -> tuple[Group, list[bytes | None]]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                self._metrics.retries.labels(reason="task").inc()
            try:
                return await self._generator.generate_group_with_routing(task, self.worker_id)
            except SampleFailed:
                self._metrics.failed_groups.inc()
                raise

        try:
            return await self._task_retry.acall(attempt, retry_on=(SampleFailed,), what=f"group {task.group_id}")
        except SampleFailed as e:
            raise _GaveUp(f"samples failed in {attempts} attempts (--task_retry.max_attempts): {e}") from e

    async def _dead_letter(self, consumer: Consumer[Task], entry: Entry[Task], reason: str) -> None:
        log.error("dead-lettering task %s: %s", entry.msg.group_id, reason)
        self._metrics.dead_letters.inc()
        await asyncio.to_thread(consumer.dead_letter, entry, reason)

    async def _publish(self, producer: Producer[Group], group: Group) -> Literal["published", "duplicate", ""]:
        """Publish once (dedup by group id); wait out backpressure. "" (falsy) if shutdown came first, "duplicate"
        when the group was published before (a redelivered task)."""
        while True:
            try:
                [entry_id] = await asyncio.to_thread(producer.publish, [group], _group_key)
            except BackpressureTimeout as e:
                if self._stopping:
                    return ""
                log.warning("rollouts stream full, retrying in %.1fs: %s", self.cfg.publish_retry_s, e)
                await asyncio.sleep(self.cfg.publish_retry_s)
                continue
            if entry_id is None:
                self._metrics.duplicates.inc()
                log.info("group %s was already published (redelivered task)", group.group_id)
                return "duplicate"
            self._metrics.groups.inc()
            return "published"

    async def _drain(self, consumer: Consumer[Task], running: dict[str, asyncio.Task[None]]) -> None:
        self._stopping = True
        if running:
            log.info("stopping: waiting up to %.0fs for %d groups", self.cfg.shutdown_timeout_s, len(running))
            deadline = time.monotonic() + self.cfg.shutdown_timeout_s
            pending = set(running.values())
            while pending and (left := deadline - time.monotonic()) > 0:  # not reading: renew the leases meanwhile
                await asyncio.to_thread(consumer.touch)
                _, pending = await asyncio.wait(pending, timeout=min(left, self._renew_s))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.warning("left %d groups unacked for other workers to reclaim", len(pending))
        _raise_if_failed(running)


class _GaveUp(RuntimeError):
    """A task's samples failed in every attempt of `[task_retry]`: dead-letter it with this reason."""


def _forget(running: dict[str, asyncio.Task[None]], entry_id: str, task: asyncio.Task[None]) -> None:
    """Drop a finished handler, unless it died of a bug: the main loop re-raises that."""
    if task.cancelled() or task.exception() is None:
        running.pop(entry_id, None)


def _raise_if_failed(running: dict[str, asyncio.Task[None]]) -> None:
    for t in running.values():
        if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
            raise RuntimeError(f"group handler {t.get_name()!r} died") from exc


async def run_worker(
    cfg: RolloutConfig, broker: Broker, stop: asyncio.Event | None = None, handle_signals: bool = True
) -> None:
    """Build the router and metrics around `broker`, run the worker until SIGTERM/SIGINT (or `stop`), clean up."""
    loop = asyncio.get_running_loop()
    # Broker calls run in threads; the default pool (cpu + 4) is too small for many concurrent groups.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=cfg.max_groups_in_flight + 4))
    stop = stop or asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    metrics = RolloutMetrics()
    router = build_router(cfg, broker)
    metrics.watch_engines(router.snapshot)
    if cfg.metrics:
        metrics.serve(cfg.metrics_host, cfg.metrics_port, cfg.metrics_port_span)
    try:
        await router.start()
        await RolloutWorker(cfg, broker, router, metrics).run(stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await router.close()
        metrics.close()
