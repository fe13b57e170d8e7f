"""The rollout worker's main loop: read tasks -> generate groups concurrently -> publish to `rollouts` -> ack.

At most `max_groups_in_flight` groups are generated at once; a task is read only when a slot is free, so
nothing sits unstarted in this worker while others idle. A group is published (dedup key = group id, so a
redelivered task is never published twice) only once all its samples have ended, and the task is acked only
after that publish. Broker calls are blocking, so they run in threads (asyncio.to_thread).

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
from concurrent.futures import ThreadPoolExecutor

from broker.base import ROLLOUTS, TASKS, BackpressureTimeout, Broker, Consumer, Entry, Producer
from broker.schemas import Group, Task
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
        self._stopping = False

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
                await asyncio.wait(running.values(), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                continue
            entries = await asyncio.to_thread(consumer.read, free, self.cfg.broker.block_s)
            for entry in entries:
                if entry.id in running:
                    continue  # our own in-flight entry, re-claimed after claim_idle_s: it is being handled
                handler = asyncio.create_task(self._handle(consumer, producer, entry), name=entry.msg.group_id)
                running[entry.id] = handler
                handler.add_done_callback(functools.partial(_forget, running, entry.id))
        await self._drain(running)
        log.info("rollout worker %s stopped", self.worker_id)

    async def _handle(self, consumer: Consumer[Task], producer: Producer[Group], entry: Entry[Task]) -> None:
        m = self._metrics
        m.in_flight_groups.inc()
        try:
            try:
                group = await self._generator.generate_group(entry.msg, self.worker_id)
            except (TaskRejected, SampleRejected) as e:
                log.error("dead-lettering task %s: %s", entry.msg.group_id, e)
                m.dead_letters.inc()
                await asyncio.to_thread(consumer.dead_letter, entry, str(e))
                return
            except SampleFailed as e:
                # Left unacked: redelivered after claim_idle_s, dead-lettered after max_deliveries.
                log.error("group %s failed, leaving its task for redelivery: %s", entry.msg.group_id, e)
                m.failed_groups.inc()
                return
            if await self._publish(producer, group):
                await asyncio.to_thread(consumer.ack, [entry.id])
        finally:
            m.in_flight_groups.dec()

    async def _publish(self, producer: Producer[Group], group: Group) -> bool:
        """Publish once (dedup by group id); wait out backpressure. False if shutdown came first."""
        while True:
            try:
                [entry_id] = await asyncio.to_thread(producer.publish, [group], _group_key)
            except BackpressureTimeout as e:
                if self._stopping:
                    return False
                log.warning("rollouts stream full, retrying in %.1fs: %s", self.cfg.publish_retry_s, e)
                await asyncio.sleep(self.cfg.publish_retry_s)
                continue
            if entry_id is None:
                self._metrics.duplicates.inc()
                log.info("group %s was already published (redelivered task)", group.group_id)
            else:
                self._metrics.groups.inc()
            return True

    async def _drain(self, running: dict[str, asyncio.Task[None]]) -> None:
        self._stopping = True
        if running:
            log.info("stopping: waiting up to %.0fs for %d groups", self.cfg.shutdown_timeout_s, len(running))
            _, pending = await asyncio.wait(list(running.values()), timeout=self.cfg.shutdown_timeout_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.warning("left %d groups unacked for other workers to reclaim", len(pending))
        _raise_if_failed(running)


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
    metrics.serve(cfg.metrics_host, cfg.metrics_port)
    try:
        await router.start()
        await RolloutWorker(cfg, broker, router, metrics).run(stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await router.close()
        metrics.close()
