"""The Redis backend's small shared state: the policy version, the engine registry and the run state.

Policy version: an integer key plus a tiny notification stream that every change appends to, both written by
one Lua script (so compare-and-set is atomic); `wait_for_change` blocks on the stream in chunks and re-reads
the key after each. Engine registry: a hash of EngineInfo JSON plus a sorted set of expiry times on the Redis
server's clock (no clock sync between hosts). Run state: one hash of strings. Run marker: one JSON string
written once (SET NX) and watched by every attached broker (`WatchedConnection`); the server's durability
settings (`durability`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from redis.exceptions import ResponseError

from broker.base import (
    BrokerError,
    EngineInfo,
    EngineRegistry,
    PolicyVersion,
    RunDataLost,
    RunMarker,
    RunState,
    marker_lost,
)
from broker.redis.connection import Connection
from broker.redis.layout import text
from broker.redis.scripts import LIVE, REGISTER, SET_VERSION
from broker.settings import BrokerConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

MARKER_CHECK_S = 1.0
"""How often an attached broker checks that Redis still holds its run's marker (one GET): a Redis restarted empty
is noticed within about this long of the next call."""


class RedisPolicyVersion(PolicyVersion):
    """An integer key plus a tiny notification stream that every change appends to (for blocking waits)."""

    def __init__(self, conn: Connection) -> None:
        self._c = conn
        self._key = conn.keys.policy_version
        self._events = conn.keys.policy_events

    def get(self) -> int:
        value = self._c.call(lambda: self._c.client.get(self._key), "GET policy_version")
        return int(value) if value is not None else 0

    def set(self, version: int) -> None:
        self._c.eval_many(SET_VERSION, [((self._key, self._events), ("", int(version)))])

    def compare_and_set(self, expected: int, new: int) -> bool:
        return bool(self._c.eval_many(SET_VERSION, [((self._key, self._events), (int(expected), int(new)))])[0])

    def _snapshot(self) -> tuple[int, bytes]:
        """The version and the last change event's id, in one transaction: a later change has a newer id."""

        def run() -> list[Any]:
            pipe = self._c.client.pipeline(transaction=True)
            pipe.get(self._key)
            pipe.xrevrange(self._events, "+", "-", count=1)
            return pipe.execute()

        value, last = self._c.call(run, "GET policy_version")
        return (int(value) if value is not None else 0), (last[0][0] if last else b"0-0")

    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            version, last_id = self._snapshot()
            left = deadline - time.monotonic()
            if version != seen or left <= 0:
                return version
            block_ms = max(1, int(min(left, self._c.block_chunk_s) * 1000))
            # Polling fallback: the loop re-reads the key after every chunk even if no event arrives.
            self._c.call(
                functools.partial(self._c.client.xread, {self._events: last_id}, count=1, block=block_ms),
                "XREAD policy events",
            )


class RedisEngineRegistry(EngineRegistry):
    def __init__(self, conn: Connection) -> None:
        self._c = conn
        self._keys = (conn.keys.engines, conn.keys.engines_expiry)

    def register(self, info: EngineInfo, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        doc = msgspec.json.encode(msgspec.structs.replace(info, heartbeat_s=time.time()))
        self._c.eval_many(REGISTER, [(self._keys, (info.engine_id, doc, float(ttl_s)))])

    def deregister(self, engine_id: str) -> None:
        def run() -> list[Any]:
            pipe = self._c.client.pipeline(transaction=True)
            pipe.hdel(self._keys[0], engine_id)
            pipe.zrem(self._keys[1], engine_id)
            return pipe.execute()

        self._c.call(run, "deregister engine")

    def live(self) -> list[EngineInfo]:
        docs = self._c.eval_many(LIVE, [(self._keys, ())])[0]
        infos = [msgspec.json.decode(d, type=EngineInfo) for d in docs if d is not None]
        return sorted(infos, key=lambda e: e.engine_id)


class RedisRunState(RunState):
    def __init__(self, conn: Connection) -> None:
        self._c = conn
        self._key = conn.keys.state

    def get(self, key: str) -> str | None:
        value = self._c.call(lambda: self._c.client.hget(self._key, key), "HGET state")
        return None if value is None else text(value)

    def set(self, key: str, value: str) -> None:
        self._c.call(lambda: self._c.client.hset(self._key, key, value), "HSET state")

    def incr(self, key: str, amount: int = 1) -> int:
        return int(self._c.call(lambda: self._c.client.hincrby(self._key, key, amount), "HINCRBY state"))

    def all(self) -> dict[str, str]:
        items = self._c.call(lambda: self._c.client.hgetall(self._key), "HGETALL state")
        return {text(k): text(v) for k, v in items.items()}


class WatchedConnection(Connection):
    """A Connection whose calls check, at most every MARKER_CHECK_S, that Redis still holds the run's marker.

    A Redis that restarted without its data answers every call as if nothing happened, and redis-py reconnects
    silently (a dead pooled connection is replaced before the command is sent), so no error tells; only reading
    back something the run wrote does. Before `watch` nothing is checked (harnesses and the launcher's probes
    read a run without attaching to it)."""

    _watching = False  # read by `call` while Connection.__init__ pings, before our __init__ set anything

    def __init__(self, config: BrokerConfig) -> None:
        self._expected: RunMarker | None = None
        self._lost: RunDataLost | None = None
        self._next_check_s = 0.0
        self._watch_lock = threading.Lock()
        super().__init__(config)

    def watch(self, marker: RunMarker | None) -> None:
        """Check for `marker` from now on; None: adopt the first marker that appears, then check for it."""
        self._expected = marker
        self._watching = True
        self._next_check_s = time.monotonic() + MARKER_CHECK_S

    def call(self, fn: Callable[[], T], what: str) -> T:
        if self._lost is not None:
            raise self._lost
        if self._watching and time.monotonic() >= self._next_check_s:
            with self._watch_lock:
                if time.monotonic() >= self._next_check_s:
                    self._next_check_s = time.monotonic() + MARKER_CHECK_S
                    self._check_marker()
        try:
            return super().call(fn, what)
        except BrokerError as e:
            # An emptied Redis often shows first as an error reply (NOGROUP: the consumer group is gone): name the
            # loss rather than the symptom.
            if self._watching and not isinstance(e, RunDataLost):
                try:
                    self._check_marker()
                except RunDataLost as lost:
                    raise lost from e
                except BrokerError:
                    pass  # Redis is unreachable: the original error says so
            raise

    def read_marker(self) -> RunMarker | None:
        """The run's marker as Redis holds it now (one GET, not checked against the watched one)."""
        return decode_marker(super().call(lambda: self.client.get(self.keys.marker), "GET marker"), self.url)

    def create_marker(self, marker: RunMarker) -> RunMarker:
        """Write `marker` unless the run has one (SET NX) and return the one Redis holds, in one transaction."""

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.keys.marker, msgspec.json.encode(marker), nx=True)
            pipe.get(self.keys.marker)
            return pipe.execute()

        stored = decode_marker(super().call(run, "SET NX marker")[1], self.url)
        assert stored is not None  # set by this transaction or before it
        return stored

    def _check_marker(self) -> None:
        found = self.read_marker()
        if self._expected is None:
            self._expected = found  # a joiner adopts the marker the owner wrote; until then nothing to check
            return
        if found != self._expected:
            self._lost = RunDataLost(marker_lost(self.url, self.keys.run_id, self._expected, found))
            log.error("%s", self._lost)
            raise self._lost


def decode_marker(value: bytes | str | None, where: str) -> RunMarker | None:
    if value is None:
        return None
    try:
        return msgspec.json.decode(value, type=RunMarker)
    except msgspec.DecodeError as e:
        raise BrokerError(
            f"Redis at {where}: the run marker is not a LongTrace run marker ({e}): {value[:200]!r}"
        ) from e


# Settings of the server that decide whether it keeps what a run writes.
EVICTION = "maxmemory-policy"
DURABILITY_SETTINGS = ("appendonly", "appendfsync", EVICTION, "maxmemory")


def durability(conn: Connection) -> list[str]:
    """Warnings about what a restart of the server at `conn` would lose; BrokerError when it may evict keys."""

    def run() -> list[Any]:
        pipe = conn.client.pipeline(transaction=False)
        for name in DURABILITY_SETTINGS:
            pipe.config_get(name)
        return pipe.execute(raise_on_error=False)

    settings: dict[str, str] = {}
    refused: list[str] = []
    for name, reply in zip(DURABILITY_SETTINGS, conn.call(run, "CONFIG GET"), strict=True):
        if isinstance(reply, ResponseError):  # managed Redis often renames or forbids CONFIG
            refused.append(f"{name} ({reply})")
        elif isinstance(reply, dict) and name in {text(k) for k in reply}:
            settings[name] = next(text(v) for k, v in reply.items() if text(k) == name)
        else:
            refused.append(f"{name} (not reported)")
    policy = settings.get(EVICTION)
    if policy is not None and policy != "noeviction":
        raise BrokerError(
            f"Redis at {conn.url} has maxmemory-policy {policy} (maxmemory {settings.get('maxmemory', '?')} bytes): "
            "it may evict this run's keys (volatile-* policies evict keys with a TTL, the dedup keys, so groups "
            "would be published twice; allkeys-* any key: queues, the run marker). Set it to noeviction (`CONFIG SET "
            "maxmemory-policy noeviction`, or in redis.conf): a full Redis then refuses writes, which the services "
            "report, instead of losing data."
        )
    warnings = []
    if settings.get("appendonly") == "no":
        warnings.append(
            f"Redis at {conn.url} runs with appendonly no: a restart loses what the run wrote since the last "
            "snapshot (the services then stop with RunDataLost). Set `appendonly yes` with appendfsync everysec or "
            "always (`longtrace up`: [redis] appendonly = true)."
        )
    elif settings.get("appendfsync") == "no":
        warnings.append(
            f"Redis at {conn.url} runs with appendfsync no: a crash of its host loses what the OS had not written "
            "yet (up to ~30 s). Set `appendfsync everysec` (at most a second) or always."
        )
    if refused:
        warnings.append(
            f"could not check {', '.join(refused)} on Redis at {conn.url}: make sure it keeps an append-only file "
            "(appendonly yes) and never evicts (maxmemory-policy noeviction), or a restart or a full memory loses "
            "the run."
        )
    for w in warnings:
        log.warning("%s", w)
    return warnings
