"""`longtrace reward worker`: scores groups from the `rollouts` stream and publishes them to `scored`.

Each replica is one consumer in a shared consumer group. Per group: score its samples concurrently, publish
a ScoredGroup with dedup key = group id, THEN ack. A replica that dies before its ack leaves the entry
pending; another replica reclaims it after `claim_idle_s` and the dedup key drops a second publish, so
nothing is lost or duplicated. A live replica renews the lease on the groups it is scoring on every turn of
its loop (`Consumer.touch`, rate-limited by the broker), whether or not it has free slots, so a judge slower
than `claim_idle_s` never makes another replica score the group again. A judge failure or a try past
`worker.score_timeout_s` is retried in-process (`worker.retry`: attempts and backoff), then the entry goes to
the dead stream with the reason; it never becomes a reward of 0. A group whose reward info cannot be scored
(e.g. a non-integer longrlvr chunk id), whose entry is larger than `max_entry_mb`, or whose scored group is
larger than the broker accepts (`--broker.max_entry_mb`) goes to the dead stream at once, and the worker goes
on. Undecodable entries never reach the worker: the broker moves them to the dead stream when it reads them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from broker.base import ROLLOUTS, SCORED, Broker, Entry, EntryTooLarge
from broker.schemas import Group, SampleReward, ScoredGroup, encode
from common.retry import RetryPolicy
from reward_service.config import RewardConfig
from reward_service.deadline import scoring_deadline
from reward_service.judges import Judge, JudgeError
from reward_service.metrics import WORKER_GROUPS
from reward_service.scoring import Scorer

log = logging.getLogger(__name__)


class RewardWorker:
    def __init__(self, config: RewardConfig, broker: Broker, judge: Judge) -> None:
        self.config = config
        self.name = config.worker.consumer_name()
        self.scorer = Scorer(judge, config)
        self.consumer = broker.consumer(ROLLOUTS, Group, config.worker.group, self.name)
        self.producer = broker.producer(SCORED, ScoredGroup)
        self._retry: RetryPolicy = config.worker.retry.policy()
        self.num_scored = 0
        self.num_dead = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; then give in-flight groups `shutdown_timeout_s` to finish. An unexpected
        error in a group (broker down, backpressure timeout) stops the worker: its entries stay pending."""
        cfg = self.config.worker
        block_s = self.config.broker.block_s
        inflight: set[asyncio.Task[None]] = set()
        log.info("reward worker %s consuming %s in group %s", self.name, ROLLOUTS, cfg.group)
        try:
            while not stop.is_set():
                free = cfg.concurrency - len(inflight)
                if free > 0:
                    entries = await asyncio.to_thread(self.consumer.read, min(free, cfg.batch_size), block_s)
                    inflight.update(asyncio.create_task(self.handle(e)) for e in entries)
                if inflight:
                    # renew the lease on the groups being scored, slots free or not (a no-op until it is due)
                    await asyncio.to_thread(self.consumer.touch)
                    done, inflight = await asyncio.wait(
                        inflight, timeout=0 if free > 0 else block_s, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()
        finally:
            if inflight:
                log.info("waiting up to %.0fs for %d in-flight groups", cfg.shutdown_timeout_s, len(inflight))
                _, pending = await asyncio.wait(inflight, timeout=cfg.shutdown_timeout_s)
                for task in pending:  # left pending in the stream: another replica reclaims them
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)

    async def handle(self, entry: Entry[Group]) -> None:
        """Score one group, publish it, then ack; or dead-letter it with the reason."""
        group = entry.msg
        start = time.perf_counter()
        # The broker hands over decoded messages; re-encoding (msgspec, ~1 GB/s) gives the entry's exact size.
        size = len(encode(group))
        if size > self.config.worker.max_entry_mb * 1024 * 1024:
            await self._dead(
                entry,
                f"entry of {size} bytes exceeds the limit of {self.config.worker.max_entry_mb} MB (--worker.max_entry_mb)",
            )
            return
        attempts = 0
        timeout_s = self.config.worker.score_timeout_s

        async def attempt() -> list[SampleReward]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                WORKER_GROUPS.labels("retried").inc()
            async with scoring_deadline(timeout_s):
                return await self.scorer.score_group(group, evaluation=not self.config.worker.zero_ill_formed)

        try:
            rewards = await self._retry.acall(
                attempt, retry_on=(JudgeError, TimeoutError), what=f"scoring group {group.group_id}"
            )
        except JudgeError as e:
            await self._dead(entry, f"judge failed after {attempts} attempts: {e}")
            return
        except TimeoutError:
            reason = (
                f"scoring took longer than {timeout_s:g} s (--worker.score_timeout_s) in each of {attempts} attempts"
            )
            await self._dead(entry, reason)
            return
        except ValueError as e:  # the group's reward info cannot be scored: retrying cannot help
            await self._dead(entry, f"cannot score group: {e}")
            return
        scored = ScoredGroup(group=group, rewards=rewards, scorer_id=self.name, score_s=time.perf_counter() - start)
        try:
            await asyncio.to_thread(
                self.producer.publish, [scored], lambda m: m.group_id, self.config.worker.publish_timeout_s
            )
        except EntryTooLarge as e:  # the scored group is larger than the group read: nothing was published
            await self._dead(entry, f"scored group cannot be published: {e}")
            return
        await asyncio.to_thread(self.consumer.ack, [entry.id])
        self.num_scored += 1
        WORKER_GROUPS.labels("scored").inc()
        log.debug("scored group %s in %.3fs", group.group_id, scored.score_s)

    async def _dead(self, entry: Entry[Group], reason: str) -> None:
        log.error("dead-lettering group %s (entry %s): %s", entry.msg.group_id, entry.id, reason)
        await asyncio.to_thread(self.consumer.dead_letter, entry, reason)
        self.num_dead += 1
        WORKER_GROUPS.labels("dead").inc()
