"""The in-process backend's producer and consumer: the Redis backend's publish, read order, claims, dead letters
and acks over a `RunStore`, with blocking calls waiting on the store's condition variable."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from broker.base import DEAD, BackpressureTimeout, Consumer, Entry, Producer, check_entry_sizes, read_deadline
from broker.entries import triage
from broker.memory.store import Pending, RunStore, StreamState
from broker.schemas import M, encode


class MemoryProducer(Producer[M]):
    def __init__(self, run: RunStore, stream: str, kind: type[M]) -> None:
        self._r = run
        self._stream = stream
        self.kind: type[M] = kind

    def publish(
        self, msgs: Sequence[M], dedup_key: Callable[[M], str] | None = None, timeout_s: float | None = None
    ) -> list[str | None]:
        cfg = self._r.config
        payloads = [encode(m) for m in msgs]
        check_entry_sizes(self._stream, payloads, cfg.max_entry_mb)
        keys = [dedup_key(m) for m in msgs] if dedup_key else None
        timeout_s = cfg.backpressure_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        out: list[str | None] = []
        cond = self._r.store.cond
        with cond:
            s = self._r.stream(self._stream)
            for i, payload in enumerate(payloads):
                while s.undelivered() >= cfg.max_backlog:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BackpressureTimeout.waited(self._stream, cfg.max_backlog, timeout_s, i, len(msgs))
                    cond.wait(left)
                if keys is not None:
                    now = time.monotonic()
                    expiry = s.dedup.get(keys[i])
                    if expiry is not None and expiry > now:
                        out.append(None)
                        continue
                    s.dedup[keys[i]] = now + cfg.dedup_ttl_s
                out.append(s.append(payload))
            cond.notify_all()
        return out

    def backlog(self) -> int:
        with self._r.store.cond:
            return len(self._r.stream(self._stream).entries)

    def undelivered(self) -> int:
        with self._r.store.cond:
            return self._r.stream(self._stream).undelivered()


class MemoryConsumer(Consumer[M]):
    def __init__(self, run: RunStore, stream: str, kind: type[M], group: str, name: str) -> None:
        self._r = run
        self._stream = stream
        self.kind: type[M] = kind
        self.group = group
        self.name = name
        self._recovering = True  # first hand back this consumer's own pending entries (a restart)
        self._recover_after = -1  # sequence number of the last own pending entry handed back
        self._next_claim_s = 0.0
        self._delivered: set[str] = set()  # handed to the application, not yet acked
        self._next_renew_s = 0.0  # the next lease renewal of the held entries (touch or read)
        self._renew_every_s = run.config.claim_idle_s / 4  # the contract: Consumer.touch

    def touch(self) -> None:
        with self._r.store.cond:
            self._renew_due(self._r.stream(self._stream))

    def _renew_due(self, s: StreamState) -> None:
        """As the Redis backend: every `claim_idle_s / 4`, renew the entries this consumer still holds and forget
        those another consumer claimed after their lease ran out (store lock held)."""
        now = time.monotonic()
        if now < self._next_renew_s:
            return
        self._next_renew_s = now + self._renew_every_s
        self._renew(s, list(self._delivered), now)

    def _renew(self, s: StreamState, ids: list[str], now: float) -> None:
        for i in ids:
            p = s.pending.get(i)
            if p is not None and p.consumer == self.name:
                p.delivered_s = now
            else:
                self._delivered.discard(i)

    def read(self, count: int, block_s: float | None = None) -> list[Entry[M]]:
        deadline = read_deadline(count, block_s, self._r.config.block_s)
        cond = self._r.store.cond
        with cond:
            s = self._r.stream(self._stream)
            while True:
                self._renew_due(s)
                raw = self._take(s, count)
                entries = self._triage(s, raw)
                if entries:
                    return entries
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return []
                if not raw:  # wake for new entries, to look for idle entries to claim, or to renew leases
                    renew = self._next_renew_s - now if self._delivered else left
                    cond.wait(max(0.0, min(left, self._r.claim_interval_s, renew)))

    def _take(self, s: StreamState, count: int) -> list[tuple[str, int]]:
        """Deliver up to `count` entry ids: own pending (once), then idle claims, then new ones."""
        now = time.monotonic()
        if self._recovering:
            own = sorted(
                (s.seqs[i], i)
                for i, p in s.pending.items()
                if p.consumer == self.name and s.seqs[i] > self._recover_after
            )[:count]
            if own:
                self._recover_after = own[-1][0]
                return [(i, self._deliver(s, i, now)) for _, i in own]
            self._recovering = False
        if now >= self._next_claim_s:
            # As the Redis backend: entries this consumer still holds are only renewed (a renewal came late),
            # never handed out again; idle entries of others are claimed, counting a delivery.
            idle = [i for i, p in s.pending.items() if now - p.delivered_s >= self._r.config.claim_idle_s]
            held = {i for i in idle if s.pending[i].consumer == self.name and i in self._delivered}
            self._renew(s, list(held), now)
            theirs = [i for i in idle if i not in held][:count]
            if theirs:
                return [(i, self._deliver(s, i, now)) for i in theirs]
            self._next_claim_s = now + self._r.claim_interval_s
        new = [i for i, seq in s.seqs.items() if seq > s.last_delivered][:count]
        if new:
            s.last_delivered = s.seqs[new[-1]]
            for i in new:
                s.pending[i] = Pending(self.name, now, 1)
            self._r.store.cond.notify_all()  # room for a producer waiting on backpressure
        return [(i, 1) for i in new]

    def _deliver(self, s: StreamState, entry_id: str, now: float) -> int:
        p = s.pending[entry_id]
        p.consumer, p.delivered_s, p.count = self.name, now, p.count + 1
        return p.count

    def _triage(self, s: StreamState, raw: list[tuple[str, int]]) -> list[Entry[M]]:
        out: list[Entry[M]] = []
        for entry_id, n in raw:
            payload = s.entries[entry_id]
            got = triage(payload, n, self.kind, self._r.config.max_deliveries)
            if isinstance(got, str):
                self._bury(entry_id, payload, n, got)
            else:
                out.append(Entry(entry_id, got, n))
        self._delivered.update(e.id for e in out)
        return out

    def ack(self, ids: Sequence[str]) -> None:
        with self._r.store.cond:
            s = self._r.stream(self._stream)
            for i in ids:
                s.remove(i)
            self._delivered.difference_update(ids)
            self._r.store.cond.notify_all()

    def dead_letter(self, entry: Entry[M], reason: str) -> None:
        with self._r.store.cond:
            self._bury(entry.id, encode(entry.msg), entry.delivery_count, reason)
            self._delivered.discard(entry.id)

    def _bury(self, entry_id: str, payload: bytes, count: int, reason: str) -> None:
        """Move an entry to the dead stream, then trim that stream to its cap (BrokerConfig.dead_max_entries, its
        policy there): the oldest letters go, as the Redis backend's XTRIM MAXLEN ~ (here exactly). Lock held."""
        self._r.bury(self._stream, entry_id, payload, count, reason, self.name)
        dead = self._r.stream(DEAD)
        for old in list(dead.entries)[: max(0, len(dead.entries) - self._r.config.dead_max_entries)]:
            dead.remove(old)
