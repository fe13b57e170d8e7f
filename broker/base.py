"""The broker's interface: what every service may do with the queues and the shared keys.

Two backends implement it: `broker.redis.RedisBroker` (the real one: Redis Streams with consumer
groups) and `broker.memory.MemoryBroker` (in-process, for learner and rollout unit tests). Services receive
a `Broker` and never touch Redis themselves; harnesses that watch a run read it through `Broker.view`
(read-only: nothing is delivered, claimed or acked).

Delivery is at-least-once. A consumer acks an entry only once its output is durable; entries of a
dead consumer are reclaimed after `claim_idle_s`; publishing with a dedup key makes redelivery
idempotent (the same group id is published to a stream at most once).

Backpressure counts only entries not yet delivered to the stream's consumer group: what a consumer holds
(delivered, not acked) is bounded by the consumer itself (the learner holds a checkpoint's worth), and
counting it would let a holder that waits for more input deadlock the producers that would supply it.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic

import msgspec

from broker.schemas import M

# Stream names (namespaced by run id by the backend).
TASKS = "tasks"
ROLLOUTS = "rollouts"
SCORED = "scored"
DEAD = "dead"
STREAMS = (TASKS, ROLLOUTS, SCORED, DEAD)


def check_stream(stream: str) -> None:
    """A typo in a stream name would create a stream no one reads: refuse it."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; streams are {', '.join(STREAMS)}")


def check_one_group(stream: str, groups: Sequence[str], group: str) -> None:
    """Acks delete entries, so a second consumer group on a stream would lose the first group's entries."""
    if list(groups) != [group]:
        raise ValueError(
            f"stream {stream!r} has consumer groups {list(groups)}: one group per stream (acked entries are "
            f"deleted), so {group!r} cannot share it"
        )


def read_deadline(count: int, block_s: float | None, default_block_s: float) -> float:
    """The monotonic deadline of a read of up to `count` entries that blocks `block_s` (None: the config's)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    block_s = default_block_s if block_s is None else block_s
    if block_s < 0:
        raise ValueError(f"block_s must be >= 0, got {block_s}")
    return time.monotonic() + block_s


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """(milliseconds, sequence) of a stream entry id `<ms>-<seq>`; ids order as these tuples do."""
    ms, sep, seq = entry_id.partition("-")
    if not (sep and ms.isdigit() and seq.isdigit()):
        raise ValueError(f"{entry_id!r} is not a stream entry id '<ms>-<seq>' (e.g. '0-0')")
    return int(ms), int(seq)


class BrokerError(RuntimeError):
    """The broker could not do what was asked within its retries and timeouts."""


class RunDataLost(BrokerError):
    """Redis no longer holds what this run wrote: the run's marker is missing or belongs to another start (a
    restart without the append-only file, FLUSHALL, eviction). The streams, dedup keys and registry are gone
    with it, so carrying on would train on an empty run: stop, restore Redis, or start a new run id."""


class RunMarker(msgspec.Struct, frozen=True, kw_only=True):
    """Written once when a run starts (`Broker.attach_run(owner=True)`) and never changed: while Redis holds it,
    Redis holds the run. A `token` tells this start from a later start of the same run id."""

    run_id: str
    started_s: float  # unix time the run started
    started_by: str  # who started it: "longtrace up", "learner", ...
    token: str

    @classmethod
    def new(cls, run_id: str, started_by: str) -> RunMarker:
        return cls(run_id=run_id, started_s=time.time(), started_by=started_by, token=uuid.uuid4().hex)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_s))
        return f"run {self.run_id!r} started at {when} by {self.started_by}"


def marker_lost(
    where: str, run_id: str, expected: RunMarker | None, found: RunMarker | None, evidence: str = ""
) -> str:
    """The message of a RunDataLost: which Redis, which run, what says the run existed, what Redis holds now."""
    known = expected.describe() if expected is not None else f"run {run_id!r} ({evidence} says it started before)"
    now = "no marker" if found is None else f"the marker of another start ({found.describe()})"
    return (
        f"Redis at {where} has {now} for {known}: it lost the run's data (append-only file off or deleted, a "
        "FLUSHALL, or eviction?). The run's queues, dedup keys, policy version and engine registry are gone; "
        "continuing would train on an empty run. Restore Redis's data, or start a new --broker.run_id."
    )


class BackpressureTimeout(BrokerError):
    """A producer waited `timeout_s` for a full stream to drain below its backlog limit."""

    @classmethod
    def waited(cls, stream: str, max_backlog: int, timeout_s: float, done: int, total: int) -> BackpressureTimeout:
        return cls(
            f"stream {stream!r} stayed at its backlog limit of {max_backlog} undelivered entries "
            f"(--broker.max_backlog) for {timeout_s:.1f}s; published {done} of {total}"
        )


class EntryTooLarge(ValueError):
    """A message's encoding is larger than `max_entry_mb`; nothing of its batch was published."""


def check_entry_sizes(stream: str, payloads: Sequence[bytes | bytearray], max_entry_mb: float) -> None:
    """Refuse the whole batch if one encoded message exceeds `max_entry_mb` (before anything is appended)."""
    limit = int(max_entry_mb * 1024 * 1024)
    for i, p in enumerate(payloads):
        if len(p) > limit:
            raise EntryTooLarge(
                f"message {i} of {len(payloads)} to stream {stream!r} is {len(p):,} bytes encoded, over "
                f"the limit of {max_entry_mb:g} MB (--broker.max_entry_mb)"
            )


@dataclass(frozen=True)
class Entry(Generic[M]):
    """One stream entry: its id (for ack), the decoded message and how often it was delivered (0 from a peek)."""

    id: str
    msg: M
    delivery_count: int


@dataclass(frozen=True)
class Undecodable:
    """An entry a consumer would move to the dead stream as undecodable, and why (the dead letter's reason)."""

    id: str
    reason: str


@dataclass(frozen=True)
class Page(Generic[M]):
    """Entries of one stream after an id, in stream order, decoded as a consumer would decode them.

    `entries` carry delivery_count 0: a peek delivers nothing. `last_id` is the id of the last entry read,
    decodable or not (the `after_id` asked for when there was none): the `after_id` of the next page."""

    entries: list[Entry[M]]
    undecodable: list[Undecodable]
    last_id: str


@dataclass(frozen=True)
class Holder:
    """A consumer that holds entries (delivered to it, not yet acked)."""

    pending: int
    idle_s: float  # since it last read, claimed or touched entries


@dataclass(frozen=True)
class GroupStats:
    pending: int  # entries delivered to the group and not yet acked
    holders: dict[str, Holder]  # consumer name -> what it holds (consumers holding nothing are left out)


@dataclass(frozen=True)
class StreamStats:
    length: int  # entries not yet acked, unread and pending (what `Producer.backlog` counts)
    groups: dict[str, GroupStats]  # its consumer group by name (one per stream; none before a consumer exists)


class EngineInfo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A rollout engine in the registry (SGLang or built-in, both speak SGLang's native API)."""

    engine_id: str
    url: str  # base URL of the native HTTP API
    backend: str = "builtin"  # builtin | sglang
    model: str = ""
    # Ranks it contributes to the weight-update group: every GPU it runs on (tp x pp x dp replicas, read from its
    # /get_server_info by weights/sglang_release.py `engine_ranks`). The name is from when only TP was counted;
    # kept, as the JSON key, so engines and readers of either release share a registry during an upgrade.
    tp_size: int = 1
    # The policy version it serves (its SGLang weight_version parsed by weights/version.py: "default" is its
    # start-up weights, 0). Stored under the JSON key "weight_version", the registry's format before the rename,
    # so engines and readers of either release share a registry during an upgrade.
    policy_version: int = msgspec.field(default=0, name="weight_version")
    heartbeat_s: float = 0.0  # unix time of the last heartbeat (set by the registry)


class Producer(abc.ABC, Generic[M]):
    @abc.abstractmethod
    def publish(
        self, msgs: Sequence[M], dedup_key: Callable[[M], str] | None = None, timeout_s: float | None = None
    ) -> list[str | None]:
        """Append `msgs` in one pipelined round trip and return their entry ids.

        With `dedup_key`, a message whose key was already published to this stream is skipped (its id
        is None): that is what makes a consumer's redelivered work idempotent. While the stream's
        backlog is at its limit (`undelivered()` >= max_backlog) the call waits, up to `timeout_s` (the
        config default when None), then raises BackpressureTimeout. A message encoded larger than
        `max_entry_mb` raises EntryTooLarge before anything of the batch is published.
        """

    @abc.abstractmethod
    def backlog(self) -> int:
        """Entries in the stream that are not yet acked (unread plus pending)."""

    @abc.abstractmethod
    def undelivered(self) -> int:
        """Entries not yet delivered to the stream's consumer group (all of them before a group exists): what
        backpressure counts."""


class Consumer(abc.ABC, Generic[M]):
    """One named consumer in a consumer group of one stream."""

    name: str

    @abc.abstractmethod
    def read(self, count: int, block_s: float | None = None) -> list[Entry[M]]:
        """Return up to `count` entries, in this order of preference: this consumer's own pending
        entries (after a restart), entries idle longer than `claim_idle_s` in other consumers
        (XAUTOCLAIM), then new entries (blocking up to `block_s`). Entries that cannot be decoded (no
        payload field included) or were delivered more than `max_deliveries` times are moved to the dead
        stream and not returned.
        """

    @abc.abstractmethod
    def ack(self, ids: Sequence[str]) -> None:
        """Acknowledge (and delete) entries whose output is durable."""

    @abc.abstractmethod
    def touch(self) -> None:
        """Renew the lease on every entry this consumer holds (delivered, not yet acked): reset their idle
        time so no other consumer claims them. Renewals come every `claim_idle_s / 4`, long before a lease runs
        out: `read` renews too (a blocking read wakes up for it), so a consumer that keeps reading need not call
        this; one busy with long work and not calling `read` calls it in its loop. Cheap to call often (at most
        one round trip per `claim_idle_s / 4`). Only entries still held are renewed: one claimed by another
        consumer after this one's lease ran out (a stall past `claim_idle_s`) stays with that consumer, and this
        one forgets it (no second holder)."""

    @abc.abstractmethod
    def dead_letter(self, entry: Entry[M], reason: str) -> None:
        """Give up on an entry: write it with `reason` to the dead stream, then ack it."""


class StreamView(abc.ABC):
    """A read-only look at one stream, for harnesses and operators watching a run: nothing is delivered,
    claimed, acked or dead-lettered, so the stream's consumers see exactly what they would without it."""

    @abc.abstractmethod
    def peek(self, kind: type[M], after_id: str = "0-0", count: int = 100) -> Page[M]:
        """Up to `count` entries with ids after `after_id` (exclusive), unread and pending alike, decoded as
        `kind`; an entry a consumer of `kind` would dead-letter as undecodable is reported in
        `Page.undecodable`, never raised."""

    @abc.abstractmethod
    def stats(self) -> StreamStats:
        """The stream's length, and what its consumer group has pending, per consumer."""

    @abc.abstractmethod
    def dedup_keys(self) -> set[str]:
        """The dedup keys published to this stream and still remembered (`dedup_ttl_s`): what was ever
        published with one, acked or not. The Redis backend scans the database for them: not for hot paths."""


class PolicyVersion(abc.ABC):
    """The published policy version v: optimizer steps whose weights reached the engines.

    A read-only copy for the other processes (admission of SFT demonstrations, dashboards, benches). Its one
    writer is the learner's coordinator (`WeightSync`, learner/weight_sync/base.py), which publishes
    `LearnerState.policy_version` (the learner's own copy) at start and after every successful push."""

    @abc.abstractmethod
    def get(self) -> int: ...

    @abc.abstractmethod
    def set(self, version: int) -> None: ...

    @abc.abstractmethod
    def compare_and_set(self, expected: int, new: int) -> bool: ...

    @abc.abstractmethod
    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        """Block until the version differs from `seen` or `timeout_s` passes; return the current version."""


class EngineRegistry(abc.ABC):
    @abc.abstractmethod
    def register(self, info: EngineInfo, ttl_s: float) -> None:
        """Add or refresh an engine; it counts as live for `ttl_s` after each call (the heartbeat)."""

    @abc.abstractmethod
    def deregister(self, engine_id: str) -> None: ...

    @abc.abstractmethod
    def live(self) -> list[EngineInfo]:
        """Engines whose last heartbeat is younger than their ttl, sorted by engine id."""


class RunState(abc.ABC):
    """Small string key/values shared by the run (status, config digest, counters)."""

    @abc.abstractmethod
    def get(self, key: str) -> str | None: ...

    @abc.abstractmethod
    def set(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    def incr(self, key: str, amount: int = 1) -> int: ...

    @abc.abstractmethod
    def all(self) -> dict[str, str]: ...


class Broker(abc.ABC):
    """Entry point: queues and keys of one run."""

    run_id: str
    policy_version: PolicyVersion
    engines: EngineRegistry
    state: RunState

    @abc.abstractmethod
    def producer(self, stream: str, kind: type[M]) -> Producer[M]: ...

    @abc.abstractmethod
    def consumer(self, stream: str, kind: type[M], group: str, name: str) -> Consumer[M]:
        """Create the consumer group if needed (from the stream's start) and return a consumer in it."""

    @abc.abstractmethod
    def view(self, stream: str) -> StreamView:
        """A read-only view of `stream` (it needs no consumer group)."""

    @abc.abstractmethod
    def check_durability(self) -> list[str]:
        """Check that the server keeps what the run writes, at a service's start.

        Raises BrokerError when it may evict the run's keys (a `maxmemory-policy` other than noeviction: volatile-*
        evicts the dedup keys, which have a TTL; allkeys-* any key). Returns, and logs, a warning per setting
        that loses data in a restart (`appendonly no`, `appendfsync no`) or that could not be checked (managed
        Redis often refuses CONFIG GET)."""

    @abc.abstractmethod
    def attach_run(self, who: str, owner: bool = False, resumed_from: str = "") -> RunMarker | None:
        """Attach this service to its run: check durability (`check_durability`), then the run's marker.

        `owner` (the launcher at a phase's start, the learner): write the marker when the run has none (a new
        run). `resumed_from` (the learner's checkpoint, ...): what says the run started before; then a missing
        marker raises RunDataLost. Others join: they adopt the marker now or once it appears.
        From then on every call of this broker checks, at most once a second, that Redis still holds the marker
        attached to, and raises RunDataLost (naming the Redis URL and the run) once it does not: a Redis
        restarted empty accepts writes as if nothing happened. Returns the marker (None: not written yet)."""

    @abc.abstractmethod
    def close(self) -> None: ...
