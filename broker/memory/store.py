"""The in-process backend's data: streams with their consumer group's pending list, dedup keys, the policy
version, engines and run state of every run, behind one condition variable per store.

`memory://NAME` URLs share one store per NAME within the process (so services built by one test talk to each
other); a bare `memory://` gets a private store.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from broker.base import DEAD, STREAMS, EngineInfo
from broker.entries import dead_letter
from broker.schemas import encode
from broker.settings import BrokerConfig

log = logging.getLogger(__name__)


@dataclass
class Pending:
    consumer: str
    delivered_s: float  # monotonic time of the last delivery
    count: int


@dataclass
class StreamState:
    entries: dict[str, bytes] = field(default_factory=dict)  # id -> payload, in id order; acked entries removed
    seqs: dict[str, int] = field(default_factory=dict)  # id -> sequence number (the order)
    next_seq: int = 0
    last_ms: int = 0  # ids never go back in time, even if the clock does (as Redis's)
    group: str | None = None  # one consumer group per stream (acked entries are deleted)
    last_delivered: int = -1  # sequence number of the last entry handed to the group
    pending: dict[str, Pending] = field(default_factory=dict)  # the group's pending entries list
    dedup: dict[str, float] = field(default_factory=dict)  # dedup key -> monotonic expiry

    def append(self, payload: bytes) -> str:
        seq = self.next_seq
        self.next_seq += 1
        self.last_ms = max(self.last_ms, int(time.time() * 1000))
        entry_id = f"{self.last_ms}-{seq}"
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
        self.streams: dict[tuple[str, str], StreamState] = {}
        self.versions: dict[str, int] = {}
        self.engines: dict[str, dict[str, tuple[EngineInfo, float]]] = {}
        self.state: dict[str, dict[str, str]] = {}

    def stream(self, run_id: str, name: str) -> StreamState:
        assert name in STREAMS, name
        return self.streams.setdefault((run_id, name), StreamState())


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


@dataclass(frozen=True)
class RunStore:
    """One run's part of a store, with the config its readers follow: what every part of a MemoryBroker holds."""

    store: MemoryStore
    run_id: str
    config: BrokerConfig

    @property
    def claim_interval_s(self) -> float:
        """How often a waiting consumer looks for idle entries of others (as the Redis backend does)."""
        return min(self.config.claim_idle_s, 1.0)

    def stream(self, name: str) -> StreamState:
        """The run's stream `name` (call with the store's lock held)."""
        return self.store.stream(self.run_id, name)

    def bury(self, stream: str, entry_id: str, payload: bytes, count: int, reason: str, by: str) -> None:
        """Move an entry to the dead stream and ack it (call with the store's lock held)."""
        if not self.stream(stream).remove(entry_id):
            return  # already acked or buried by someone else: nothing to give up on
        log.warning("dead letter %s/%s after %d deliveries: %s", stream, entry_id, count, reason)
        letter = dead_letter(stream, entry_id, payload, count, reason, by)
        self.stream(DEAD).append(encode(letter))
        self.store.cond.notify_all()
