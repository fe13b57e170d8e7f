"""The in-process broker: the same contract as `RedisBroker`, for learner and rollout unit tests.

Messages are stored encoded, so a test sees the same (de)serialisation, SchemaError dead letters,
redelivery counts, claims of idle entries, backpressure (on undelivered entries) and dedup as against Redis. One condition
variable per store guards everything; blocking calls wait on it with a timeout.

`memory://NAME` URLs share one store per NAME within the process (so services built by one test talk
to each other); a bare `memory://` gets a private store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from broker.base import (
    DEAD,
    STREAMS,
    BackpressureTimeout,
    Broker,
    Consumer,
    EngineInfo,
    EngineRegistry,
    Entry,
    PolicyVersion,
    Producer,
    RunState,
    check_entry_sizes,
)
from broker.schemas import DeadLetter, M, SchemaError, decode, encode
from broker.settings import BrokerConfig

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    consumer: str
    delivered_s: float  # monotonic time of the last delivery
    count: int


@dataclass
class _Stream:
    entries: dict[str, bytes] = field(default_factory=dict)  # id -> payload, in id order; acked entries removed
    seqs: dict[str, int] = field(default_factory=dict)  # id -> sequence number (the order)
    next_seq: int = 0
    group: str | None = None  # one consumer group per stream (acked entries are deleted)
    last_delivered: int = -1  # sequence number of the last entry handed to the group
    pending: dict[str, _Pending] = field(default_factory=dict)  # the group's pending entries list
    dedup: dict[str, float] = field(default_factory=dict)  # dedup key -> monotonic expiry

    def append(self, payload: bytes) -> str:
        seq = self.next_seq
        self.next_seq += 1
        entry_id = f"{int(time.time() * 1000)}-{seq}"
        self.entries[entry_id] = payload
        self.seqs[entry_id] = seq
        return entry_id

    def undelivered(self) -> int:
        """Entries not yet handed to the group (every pending entry is still in `entries`)."""
        return len(self.entries) - len(self.pending)

    def remove(self, entry_id: str) -> bool:
        """Ack and delete; return whether the entry was pending."""
        self.entries.pop(entry_id, None)
        self.seqs.pop(entry_id, None)
        return self.pending.pop(entry_id, None) is not None


class MemoryStore:
    """The shared state behind one or more MemoryBrokers (one per `memory://NAME`)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.streams: dict[tuple[str, str], _Stream] = {}
        self.versions: dict[str, int] = {}
        self.engines: dict[str, dict[str, tuple[EngineInfo, float]]] = {}
        self.state: dict[str, dict[str, str]] = {}

    def stream(self, run_id: str, name: str) -> _Stream:
        assert name in STREAMS, name
        return self.streams.setdefault((run_id, name), _Stream())


_STORES: dict[str, MemoryStore] = {}
_STORES_LOCK = threading.Lock()


def store_for_url(url: str) -> MemoryStore:
    """The process-wide store of `memory://NAME`; a fresh private one for `memory://`."""
    if not url.startswith("memory://"):
        raise ValueError(f"--broker.redis_url: {url!r} is not a memory:// URL")
    name = url.removeprefix("memory://").strip("/")
    if not name:
        return MemoryStore()
    with _STORES_LOCK:
        return _STORES.setdefault(name, MemoryStore())


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; streams are {', '.join(STREAMS)}")


class MemoryProducer(Producer[M]):
    def __init__(self, broker: MemoryBroker, stream: str, kind: type[M]) -> None:
        self._b = broker
        self._stream = stream
        self.kind: type[M] = kind

    def publish(
        self, msgs: Sequence[M], dedup_key: Callable[[M], str] | None = None, timeout_s: float | None = None
    ) -> list[str | None]:
        cfg = self._b.config
        payloads = [encode(m) for m in msgs]
        check_entry_sizes(self._stream, payloads, cfg.max_entry_mb)
        keys = [dedup_key(m) for m in msgs] if dedup_key else None
        timeout_s = cfg.backpressure_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        out: list[str | None] = []
        store = self._b.store
        with store.cond:
            s = store.stream(self._b.run_id, self._stream)
            for i, payload in enumerate(payloads):
                while s.undelivered() >= cfg.max_backlog:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BackpressureTimeout(
                            f"stream {self._stream!r} stayed at its backlog limit of {cfg.max_backlog} undelivered "
                            f"entries (--broker.max_backlog) for {timeout_s:.1f}s; published {i} of {len(msgs)}"
                        )
                    store.cond.wait(left)
                if keys is not None:
                    now = time.monotonic()
                    expiry = s.dedup.get(keys[i])
                    if expiry is not None and expiry > now:
                        out.append(None)
                        continue
                    s.dedup[keys[i]] = now + cfg.dedup_ttl_s
                out.append(s.append(payload))
            store.cond.notify_all()
        return out

    def backlog(self) -> int:
        with self._b.store.cond:
            return len(self._b.store.stream(self._b.run_id, self._stream).entries)

    def undelivered(self) -> int:
        with self._b.store.cond:
            return self._b.store.stream(self._b.run_id, self._stream).undelivered()


class MemoryConsumer(Consumer[M]):
    def __init__(self, broker: MemoryBroker, stream: str, kind: type[M], group: str, name: str) -> None:
        self._b = broker
        self._stream = stream
        self.kind: type[M] = kind
        self.group = group
        self.name = name
        self._recovering = True  # first hand back this consumer's own pending entries (a restart)
        self._recover_after = -1  # sequence number of the last own pending entry handed back
        self._next_claim_s = 0.0
        self._delivered: set[str] = set()  # handed to the application, not yet acked

    def touch(self) -> None:
        store = self._b.store
        with store.cond:
            s = store.stream(self._b.run_id, self._stream)
            now = time.monotonic()
            for i in self._delivered:
                if i in s.pending:
                    s.pending[i].delivered_s = now

    def read(self, count: int, block_s: float | None = None) -> list[Entry[M]]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        cfg = self._b.config
        block_s = cfg.block_s if block_s is None else block_s
        if block_s < 0:
            raise ValueError(f"block_s must be >= 0, got {block_s}")
        deadline = time.monotonic() + block_s
        store = self._b.store
        with store.cond:
            s = store.stream(self._b.run_id, self._stream)
            while True:
                raw = self._take(s, count)
                entries = self._triage(s, raw)
                if entries:
                    return entries
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                if not raw:  # wake for new entries, or to look for idle entries to claim
                    store.cond.wait(min(left, self._b.claim_interval_s))

    def _take(self, s: _Stream, count: int) -> list[tuple[str, int]]:
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
            # As the Redis backend: entries this consumer still holds are only touched (their holder is
            # alive), never handed out again; idle entries of others are claimed, counting a delivery.
            idle = [i for i, p in s.pending.items() if now - p.delivered_s >= self._b.config.claim_idle_s]
            for i in idle:
                if i in self._delivered:
                    s.pending[i].delivered_s = now
            theirs = [i for i in idle if i not in self._delivered][:count]
            if theirs:
                return [(i, self._deliver(s, i, now)) for i in theirs]
            self._next_claim_s = now + self._b.claim_interval_s
        new = [i for i, seq in s.seqs.items() if seq > s.last_delivered][:count]
        if new:
            s.last_delivered = s.seqs[new[-1]]
            for i in new:
                s.pending[i] = _Pending(self.name, now, 1)
            self._b.store.cond.notify_all()  # room for a producer waiting on backpressure
        return [(i, 1) for i in new]

    def _deliver(self, s: _Stream, entry_id: str, now: float) -> int:
        p = s.pending[entry_id]
        p.consumer, p.delivered_s, p.count = self.name, now, p.count + 1
        return p.count

    def _triage(self, s: _Stream, raw: list[tuple[str, int]]) -> list[Entry[M]]:
        max_deliveries = self._b.config.max_deliveries
        out: list[Entry[M]] = []
        for entry_id, n in raw:
            payload = s.entries[entry_id]
            if n > max_deliveries:
                reason = f"delivered {n} times (max_deliveries {max_deliveries})"
                self._b.bury(s, self._stream, entry_id, payload, n, reason, self.name)
                continue
            try:
                msg = decode(payload, self.kind)
            except SchemaError as e:
                self._b.bury(s, self._stream, entry_id, payload, n, f"undecodable: {e}", self.name)
                continue
            out.append(Entry(entry_id, msg, n))
        self._delivered.update(e.id for e in out)
        return out

    def ack(self, ids: Sequence[str]) -> None:
        store = self._b.store
        with store.cond:
            s = store.stream(self._b.run_id, self._stream)
            for i in ids:
                s.remove(i)
            self._delivered.difference_update(ids)
            store.cond.notify_all()

    def dead_letter(self, entry: Entry[M], reason: str) -> None:
        store = self._b.store
        with store.cond:
            s = store.stream(self._b.run_id, self._stream)
            self._b.bury(s, self._stream, entry.id, encode(entry.msg), entry.delivery_count, reason, self.name)
            self._delivered.discard(entry.id)


class MemoryPolicyVersion(PolicyVersion):
    def __init__(self, broker: MemoryBroker) -> None:
        self._b = broker

    def get(self) -> int:
        with self._b.store.cond:
            return self._b.store.versions.get(self._b.run_id, 0)

    def set(self, version: int) -> None:
        with self._b.store.cond:
            self._b.store.versions[self._b.run_id] = version
            self._b.store.cond.notify_all()

    def compare_and_set(self, expected: int, new: int) -> bool:
        with self._b.store.cond:
            if self._b.store.versions.get(self._b.run_id, 0) != expected:
                return False
            self._b.store.versions[self._b.run_id] = new
            self._b.store.cond.notify_all()
            return True

    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        store = self._b.store
        with store.cond:
            store.cond.wait_for(lambda: store.versions.get(self._b.run_id, 0) != seen, timeout_s)
            return store.versions.get(self._b.run_id, 0)


class MemoryEngineRegistry(EngineRegistry):
    def __init__(self, broker: MemoryBroker) -> None:
        self._b = broker

    def register(self, info: EngineInfo, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        info = msgspec.structs.replace(info, heartbeat_s=time.time())
        with self._b.store.cond:
            self._b.store.engines.setdefault(self._b.run_id, {})[info.engine_id] = (info, time.monotonic() + ttl_s)

    def deregister(self, engine_id: str) -> None:
        with self._b.store.cond:
            self._b.store.engines.get(self._b.run_id, {}).pop(engine_id, None)

    def live(self) -> list[EngineInfo]:
        now = time.monotonic()
        with self._b.store.cond:
            engines = self._b.store.engines.setdefault(self._b.run_id, {})
            for engine_id in [e for e, (_, expiry) in engines.items() if expiry <= now]:
                del engines[engine_id]
            return [info for _, (info, _) in sorted(engines.items())]


class MemoryRunState(RunState):
    def __init__(self, broker: MemoryBroker) -> None:
        self._b = broker

    def _d(self) -> dict[str, str]:
        return self._b.store.state.setdefault(self._b.run_id, {})

    def get(self, key: str) -> str | None:
        with self._b.store.cond:
            return self._d().get(key)

    def set(self, key: str, value: str) -> None:
        with self._b.store.cond:
            self._d()[key] = value

    def incr(self, key: str, amount: int = 1) -> int:
        with self._b.store.cond:
            d = self._d()
            value = int(d.get(key, "0")) + amount
            d[key] = str(value)
            return value

    def all(self) -> dict[str, str]:
        with self._b.store.cond:
            return dict(self._d())


class MemoryBroker(Broker):
    """In-process broker over a `MemoryStore` (a private one unless given)."""

    def __init__(self, config: BrokerConfig | None = None, store: MemoryStore | None = None) -> None:
        self.config = config or BrokerConfig.model_validate({"redis_url": "memory://"})
        self.store = store or MemoryStore()
        self.run_id = self.config.run_id
        # How often a waiting consumer looks for idle entries of others (as the Redis backend does).
        self.claim_interval_s = min(self.config.claim_idle_s, 1.0)
        self.policy_version = MemoryPolicyVersion(self)
        self.engines = MemoryEngineRegistry(self)
        self.state = MemoryRunState(self)

    def producer(self, stream: str, kind: type[M]) -> Producer[M]:
        _check_stream(stream)
        return MemoryProducer(self, stream, kind)

    def consumer(self, stream: str, kind: type[M], group: str, name: str) -> Consumer[M]:
        _check_stream(stream)
        with self.store.cond:
            s = self.store.stream(self.run_id, stream)
            if s.group is None:
                s.group = group
            elif s.group != group:
                raise ValueError(
                    f"stream {stream!r} already has consumer group {s.group!r}: one group per stream "
                    f"(acked entries are deleted), so {group!r} cannot be added"
                )
        return MemoryConsumer(self, stream, kind, group, name)

    def bury(self, s: _Stream, stream: str, entry_id: str, payload: bytes, count: int, reason: str, by: str) -> None:
        """Move an entry to the dead stream and ack it (call with the store's lock held)."""
        if not s.remove(entry_id):
            return  # already acked or buried by someone else: nothing to give up on
        log.warning("dead letter %s/%s after %d deliveries: %s", stream, entry_id, count, reason)
        letter = DeadLetter(
            stream=stream,
            entry_id=entry_id,
            reason=reason,
            delivery_count=count,
            payload=payload,
            consumer=by,
            created_s=time.time(),
        )
        self.store.stream(self.run_id, DEAD).append(encode(letter))
        self.store.cond.notify_all()

    def close(self) -> None:
        """Nothing to release; the store outlives the broker (other brokers may share it)."""
