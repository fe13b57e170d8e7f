"""The Redis backend of the broker: Redis Streams with one consumer group per stream (redis-py, sync).

Keys are `longtrace:{<run_id>}:<name>`; the braces are a cluster hash tag, so one run lives in one slot
and every transaction or Lua script may touch all of its keys. Each entry has one field, `d`, the
msgspec-encoded message; an entry without it (a foreign producer) is dead-lettered like an undecodable
one. A stream is a queue: consumers XACK and XDEL an entry in one MULTI, so XLEN is the backlog (unread
plus pending) and XLEN minus the group's pending count (XINFO GROUPS) is what is not yet delivered.
Needs Redis >= 6.2 (XPENDING IDLE); XINFO GROUPS `lag` (7.0) is not used. Async services call this
through asyncio.to_thread.

Idempotency: a publish with a dedup key WATCHes the keys, skips those already set, then SETs each new
key and XADDs its message in one MULTI/EXEC, so neither a crash nor a retry after a lost reply can lose
or double a message. Without a dedup key a publish that is retried after its reply was lost may append
the message twice (at-least-once). Acks and dead letters are idempotent.

Backpressure: a producer adds only as many entries as fit under `max_backlog` undelivered ones (XLEN and
XINFO GROUPS read in the same round trip) and polls both while the stream is full. Entries a consumer
holds do not count (see broker.base). Neither is watched (consumers change them all the time), so
producers publishing at the same instant may overshoot the limit by their batches.

Every call has a socket timeout; a blocking read blocks in chunks shorter than that timeout. Lost
connections are retried with jittered exponential backoff (common.retry.RetryPolicy), bounded by
`retry_attempts` and `retry_deadline_s`; redis-py's own retry is off so that retries do not nest.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from broker.base import (
    DEAD,
    STREAMS,
    BackpressureTimeout,
    Broker,
    BrokerError,
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
from common.logs import warn_once
from common.retry import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

FIELD = b"d"  # the one field of every entry: the encoded message
_RETRY_ON: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
_VERSION_EVENTS_MAXLEN = 16  # the notification stream only needs its last id


@dataclass(frozen=True)
class _Script:
    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


# KEYS: stream, dead stream; ARGV: group, entry id, encoded DeadLetter. -> 1 buried | 0 was not pending.
# Only an entry still pending is written to `dead`, so a retried call cannot bury it twice.
_BURY = _Script(
    "bury",
    """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then redis.call('XADD', KEYS[2], '*', 'd', ARGV[3]) end
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
""",
)

# KEYS: version key, events stream; ARGV: expected ('' = unconditional), new version. -> 1 set | 0 mismatch
_SET_VERSION = _Script(
    "set_version",
    f"""
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[1] ~= '' and cur ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '{_VERSION_EVENTS_MAXLEN}', '*', 'v', ARGV[2])
return 1
""",
)

# Expiry times use the Redis server's clock, so engines and readers on other hosts need no clock sync.
# KEYS: info hash, expiry zset; ARGV: engine id, EngineInfo JSON, ttl s
_REGISTER = _Script(
    "register",
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.6f', now + tonumber(ARGV[3])), ARGV[1])
return 1
""",
)

# KEYS: info hash, expiry zset. Drops expired engines, returns the JSON of the live ones.
_LIVE = _Script(
    "live",
    """
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[1], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[1], unpack(ids))
""",
)


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; streams are {', '.join(STREAMS)}")


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read_replies(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send `commands` pipelined on one connection and read every reply; error replies are returned as
    ResponseError values, so the connection stays in step with the server."""
    conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except ResponseError as e:
            replies.append(e)
    return replies


def _round_trip(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """As `_read_replies`, then raise the first error reply."""
    replies = _read_replies(conn, commands)
    for r in replies:
        if isinstance(r, ResponseError):
            raise r
    return replies


def _undelivered(xlen: Any, groups: Any) -> int:
    """XLEN minus the pending count of the stream's groups (XINFO GROUPS, raw or parsed by redis-py). Every
    pending entry is still in the stream (acks delete atomically), so this is what no consumer has yet.
    XINFO GROUPS on a stream that does not exist yet is an error reply: nothing is pending then."""
    if isinstance(groups, ResponseError):
        if "no such key" not in str(groups).lower():
            raise groups
        groups = []
    pending = 0
    for g in groups:
        pairs = g.items() if isinstance(g, dict) else zip(g[::2], g[1::2], strict=True)
        pending += next(int(v) for k, v in pairs if _text(k) == "pending")
    return max(0, int(xlen) - pending)


# A delivered entry before triage: id, its fields (None when it was deleted while pending), delivery count.
_Raw = tuple[str, dict[bytes, bytes] | None, int]


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The (id, fields) pairs of an XREADGROUP/XREAD reply on one stream."""
    if not reply:
        return []
    return list(reply[0][1])


class RedisProducer(Producer[M]):
    def __init__(self, broker: RedisBroker, stream: str, kind: type[M]) -> None:
        self._b = broker
        self._stream = stream
        self._key = broker.key(stream)
        self.kind: type[M] = kind

    def publish(
        self, msgs: Sequence[M], dedup_key: Callable[[M], str] | None = None, timeout_s: float | None = None
    ) -> list[str | None]:
        cfg = self._b.config
        timeout_s = cfg.backpressure_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        payloads = [encode(m) for m in msgs]
        check_entry_sizes(self._stream, payloads, cfg.max_entry_mb)
        keys = [self._b.key(f"dedup:{self._stream}:{dedup_key(m)}") for m in msgs] if dedup_key else None
        ids: list[str | None] = [None] * len(msgs)
        todo = list(range(len(msgs)))
        while todo:
            done = self._b.call(
                functools.partial(self._publish_some, todo, payloads, keys), f"publish to {self._stream}"
            )
            if done is None:  # a dedup key of ours was published concurrently: look again
                continue
            for i, entry_id in done.items():
                ids[i] = entry_id
            todo = [i for i in todo if i not in done]
            if todo:
                self._wait_for_room(deadline, timeout_s, len(msgs) - len(todo), len(msgs))
        return ids

    def _publish_some(
        self, todo: list[int], payloads: list[bytes], keys: list[str] | None
    ) -> dict[int, str | None] | None:
        """One optimistic attempt on one connection, two round trips: [WATCH dedup keys, MGET them, XLEN,
        XINFO GROUPS], then [MULTI, (SET key, XADD) per new message that fits under the backlog limit, EXEC].

        Returns the messages it settled (entry id, or None for a duplicate), a prefix of `todo` in order;
        the rest found the stream full. None when EXEC aborted because a watched key changed. The MULTI
        makes SET and XADD one unit, so a crash or a retry after a lost reply can neither lose nor
        double a message. (A Lua script per message would do the same, but Redis copies each payload
        twice more on the way into Lua and back: about 430 us of server time per 640 KB group here,
        which cut the benchmark's ratio to raw redis-py to 0.55-0.75.)
        """
        client = self._b.client
        conn: Any = client.connection_pool.get_connection()
        try:
            first: list[tuple[Any, ...]] = [("XLEN", self._key), ("XINFO", "GROUPS", self._key)]
            if keys is not None:
                batch_keys: list[str] = [keys[i] for i in todo]
                first = [("WATCH", *batch_keys), ("MGET", *batch_keys), *first]
            replies = _read_replies(conn, first)
            for r in replies[:-1]:
                if isinstance(r, ResponseError):
                    raise r
            room = self._b.config.max_backlog - _undelivered(replies[-2], replies[-1])
            seen = replies[1] if keys is not None else [None] * len(todo)
            settled: dict[int, str | None] = {}
            fresh: list[int] = []
            taken: set[str] = set()
            for i, prior in zip(todo, seen, strict=True):
                key = keys[i] if keys is not None else None
                if prior is not None or (key is not None and key in taken):
                    settled[i] = None
                elif len(fresh) < room:
                    fresh.append(i)
                    if key is not None:
                        taken.add(key)
                else:
                    break  # keep order: the rest wait for room
            if not fresh:
                if keys is not None:
                    _round_trip(conn, [("UNWATCH",)])
                return settled
            if keys is None:
                added = _round_trip(conn, [("XADD", self._key, "*", FIELD, payloads[i]) for i in fresh])
            else:
                ttl_ms = int(self._b.config.dedup_ttl_s * 1000)
                cmds: list[tuple[Any, ...]] = [("MULTI",)]
                for i in fresh:
                    cmds += [("SET", keys[i], b"1", "PX", ttl_ms), ("XADD", self._key, "*", FIELD, payloads[i])]
                result = _round_trip(conn, [*cmds, ("EXEC",)])[-1]
                if result is None:
                    return None
                added = result[1::2]
            for r in added:
                if isinstance(r, Exception):
                    raise r
            settled.update((i, _text(r)) for i, r in zip(fresh, added, strict=True))
            return settled
        except BaseException:
            conn.disconnect()  # it may hold a WATCH or unread replies: never hand it back as is
            raise
        finally:
            client.connection_pool.release(conn)

    def _wait_for_room(self, deadline: float, timeout_s: float, done: int, total: int) -> None:
        """Poll the undelivered count (cheap, unlike resending payloads) until the stream is below its limit."""
        sleep_s = 0.002
        while self.undelivered() >= self._b.config.max_backlog:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackpressureTimeout(
                    f"stream {self._stream!r} stayed at its backlog limit of {self._b.config.max_backlog} undelivered "
                    f"entries (--broker.max_backlog) for {timeout_s:.1f}s; published {done} of {total}"
                )
            time.sleep(min(sleep_s, left))
            sleep_s = min(sleep_s * 2, 0.05)

    def backlog(self) -> int:
        return int(self._b.call(lambda: self._b.client.xlen(self._key), "XLEN"))

    def undelivered(self) -> int:
        def run() -> int:
            pipe = self._b.client.pipeline(transaction=False)
            pipe.xlen(self._key)
            pipe.xinfo_groups(self._key)
            xlen, groups = pipe.execute(raise_on_error=False)
            if isinstance(xlen, ResponseError):
                raise xlen
            return _undelivered(xlen, groups)

        return self._b.call(run, "XLEN+XINFO GROUPS")


class RedisConsumer(Consumer[M]):
    def __init__(self, broker: RedisBroker, stream: str, kind: type[M], group: str, name: str) -> None:
        self._b = broker
        self._stream = stream
        self._key = broker.key(stream)
        self.kind: type[M] = kind
        self.group = group
        self.name = name
        self._lock = threading.Lock()
        # Own pending entries are re-read from this id until none are left (after a restart); None once done.
        self._recover_from: str | None = "0"
        self._next_claim_s = 0.0
        # Entries handed to the application and not yet acked: a re-read of own pending entries after a
        # lost reply must not hand them out again.
        self._delivered: set[str] = set()
        self._next_touch_s = 0.0

    def touch(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next_touch_s or not self._delivered:
                return
            self._next_touch_s = now + self._b.config.claim_idle_s / 4
            held: list[Any] = sorted(self._delivered)
            # JUSTID: reset the idle time without counting a delivery.
            self._b.call(
                lambda: self._b.client.xclaim(self._key, self.group, self.name, 0, held, justid=True), "XCLAIM JUSTID"
            )

    def read(self, count: int, block_s: float | None = None) -> list[Entry[M]]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        block_s = self._b.config.block_s if block_s is None else block_s
        if block_s < 0:
            raise ValueError(f"block_s must be >= 0, got {block_s}")
        deadline = time.monotonic() + block_s
        with self._lock:
            while True:
                raw = self._take(count, deadline)
                entries = self._triage(raw)
                if entries or (not raw and time.monotonic() >= deadline):
                    return entries

    def _take(self, count: int, deadline: float) -> list[_Raw]:
        """Deliver up to `count` raw entries."""
        if self._recover_from is not None:
            got = self._read_own_pending(count)
            if got:
                return got
        if time.monotonic() >= self._next_claim_s:
            got = self._claim_idle(count)
            if got:
                return got
        return self._read_new(count, min(deadline - time.monotonic(), self._b.block_chunk_s))

    def _read_own_pending(self, count: int) -> list[_Raw]:
        start = self._recover_from
        assert start is not None
        reply = self._b.call(
            lambda: self._b.client.xreadgroup(self.group, self.name, {self._key: start}, count=count), "XREADGROUP 0"
        )
        entries = _entries(reply)
        # A full page may have more behind it; the next read pages on from its last id.
        self._recover_from = entries[-1][0].decode() if len(entries) >= count else None
        pairs = [(i, f) for i, f in entries if i.decode() not in self._delivered]
        if not pairs:
            return []
        counts = self._delivery_counts([i for i, _ in pairs])
        return [(i.decode(), f, n) for (i, f), n in zip(pairs, counts, strict=True)]

    def _claim_idle(self, count: int) -> list[_Raw]:
        """Claim entries idle longer than claim_idle_s in the group's pending list (a dead consumer's).

        XPENDING IDLE + XCLAIM rather than XAUTOCLAIM: XAUTOCLAIM would also hand this consumer the
        entries it still holds (the learner holds its until a checkpoint) and count a delivery each
        time. Those are only touched (XCLAIM JUSTID resets their idle time without counting), which
        also tells other consumers that their holder is alive.
        """
        idle_ms = int(self._b.config.claim_idle_s * 1000)
        # Paged: the pending list holds what consumers hold besides the backlog (the learner: a checkpoint's worth).
        page = max(self._b.config.max_backlog, count)
        rows: list[Any] = []
        start = "-"
        while True:
            got: Any = self._b.call(
                functools.partial(self._b.client.xpending_range, self._key, self.group, start, "+", page, idle=idle_ms),
                "XPENDING",
            )
            rows += got
            if len(got) < page:
                break
            start = "(" + _text(got[-1]["message_id"])  # exclusive range start (Redis >= 6.2)
        held = [r["message_id"] for r in rows if _text(r["message_id"]) in self._delivered]
        theirs = {r["message_id"]: r["times_delivered"] for r in rows if _text(r["message_id"]) not in self._delivered}
        if held:
            self._b.call(
                lambda: self._b.client.xclaim(self._key, self.group, self.name, 0, held, justid=True), "XCLAIM JUSTID"
            )
        if not theirs:
            self._next_claim_s = time.monotonic() + self._b.claim_interval_s
            return []
        ids = list(theirs)[:count]
        # min idle again: an entry claimed by another consumer in between is skipped, not stolen back.
        claimed: Any = self._b.call(
            lambda: self._b.client.xclaim(self._key, self.group, self.name, idle_ms, ids), "XCLAIM"
        )
        pairs = [(i, f) for i, f in claimed if i is not None]
        if len(pairs) < len(claimed):
            # Redis 6.2 keeps deleted entries in the PEL; ours never are (ack deletes atomically).
            warn_once(log, f"XCLAIM on {self._key!r} met pending entries that were deleted outside the broker")
        if pairs:
            log.info("%s claimed %d idle entries of %s", self.name, len(pairs), self._stream)
        else:
            self._next_claim_s = time.monotonic() + self._b.claim_interval_s
        return [(_text(i), f, theirs[i] + 1) for i, f in pairs]

    def _delivery_counts(self, ids: list[bytes]) -> list[int]:
        def run() -> list[Any]:
            pipe = self._b.client.pipeline(transaction=False)
            for i in ids:
                pipe.xpending_range(self._key, self.group, i, i, 1, consumername=self.name)
            return pipe.execute()

        # An id claimed away by another consumer in between has no row here: count it as one delivery more.
        return [rows[0]["times_delivered"] if rows else 1 for rows in self._b.call(run, "XPENDING")]

    def _read_new(self, count: int, block_s: float) -> list[_Raw]:
        block_ms = int(block_s * 1000)

        def run() -> Any:
            try:
                return self._b.client.xreadgroup(
                    self.group, self.name, {self._key: ">"}, count=count, block=block_ms if block_ms > 0 else None
                )
            except _RETRY_ON:
                # The reply may be lost after Redis delivered entries to us: re-read own pending ones.
                self._recover_from = "0"
                raise

        return [(i.decode(), f, 1) for i, f in _entries(self._b.call(run, "XREADGROUP"))]

    def _triage(self, raw: list[_Raw]) -> list[Entry[M]]:
        """Decode; entries that are undecodable (no payload field included) or delivered too often go to `dead`,
        deleted ones are acked."""
        out: list[Entry[M]] = []
        dead: list[tuple[str, bytes, int, str]] = []
        gone: list[str] = []
        max_deliveries = self._b.config.max_deliveries
        for entry_id, fields, n in raw:
            if fields is None:  # deleted while pending (outside the broker): nothing left to give up on
                gone.append(entry_id)
                continue
            payload = fields.get(FIELD)
            if payload is None:
                # A foreign producer's entry: keep all its fields (msgpack map) so the letter shows what came.
                names = sorted(_text(k) for k in fields)
                reason = f"undecodable: no payload field {FIELD.decode()!r} (the entry has fields {names})"
                dead.append((entry_id, msgspec.msgpack.encode(fields), n, reason))
            elif n > max_deliveries:
                dead.append((entry_id, payload, n, f"delivered {n} times (max_deliveries {max_deliveries})"))
            else:
                try:
                    out.append(Entry(entry_id, decode(payload, self.kind), n))
                except SchemaError as e:
                    dead.append((entry_id, payload, n, f"undecodable: {e}"))
        if dead:
            self._bury(dead)
        if gone:
            self.ack(gone)
        self._delivered.update(e.id for e in out)
        return out

    def _bury(self, items: list[tuple[str, bytes, int, str]]) -> None:
        dead_key = self._b.key(DEAD)
        calls = []
        for entry_id, payload, n, reason in items:
            letter = DeadLetter(
                stream=self._stream,
                entry_id=entry_id,
                reason=reason,
                delivery_count=n,
                payload=payload,
                consumer=self.name,
                created_s=time.time(),
            )
            calls.append(((self._key, dead_key), (self.group, entry_id, encode(letter))))
        for (entry_id, _, n, reason), buried in zip(items, self._b.eval_many(_BURY, calls), strict=True):
            self._delivered.discard(entry_id)
            if buried:
                log.warning("dead letter %s/%s after %d deliveries: %s", self._stream, entry_id, n, reason)

    def ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return

        def run() -> list[Any]:
            pipe = self._b.client.pipeline(transaction=True)
            pipe.xack(self._key, self.group, *ids)
            pipe.xdel(self._key, *ids)
            return pipe.execute()

        self._b.call(run, "XACK+XDEL")
        self._delivered.difference_update(ids)

    def dead_letter(self, entry: Entry[M], reason: str) -> None:
        # No lock: a read blocked in another thread must not delay giving up on an entry.
        self._bury([(entry.id, encode(entry.msg), entry.delivery_count, reason)])


class RedisPolicyVersion(PolicyVersion):
    """An integer key plus a tiny notification stream that every change appends to (for blocking waits)."""

    def __init__(self, broker: RedisBroker) -> None:
        self._b = broker
        self._key = broker.key("policy_version")
        self._events = broker.key("policy_version:events")

    def get(self) -> int:
        value = self._b.call(lambda: self._b.client.get(self._key), "GET policy_version")
        return int(value) if value is not None else 0

    def set(self, version: int) -> None:
        self._b.eval_many(_SET_VERSION, [((self._key, self._events), ("", int(version)))])

    def compare_and_set(self, expected: int, new: int) -> bool:
        return bool(self._b.eval_many(_SET_VERSION, [((self._key, self._events), (int(expected), int(new)))])[0])

    def _snapshot(self) -> tuple[int, bytes]:
        """The version and the last change event's id, in one transaction: a later change has a newer id."""

        def run() -> list[Any]:
            pipe = self._b.client.pipeline(transaction=True)
            pipe.get(self._key)
            pipe.xrevrange(self._events, "+", "-", count=1)
            return pipe.execute()

        value, last = self._b.call(run, "GET policy_version")
        return (int(value) if value is not None else 0), (last[0][0] if last else b"0-0")

    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            version, last_id = self._snapshot()
            left = deadline - time.monotonic()
            if version != seen or left <= 0:
                return version
            block_ms = max(1, int(min(left, self._b.block_chunk_s) * 1000))
            # Polling fallback: the loop re-reads the key after every chunk even if no event arrives.
            self._b.call(
                functools.partial(self._b.client.xread, {self._events: last_id}, count=1, block=block_ms),
                "XREAD policy events",
            )


class RedisEngineRegistry(EngineRegistry):
    def __init__(self, broker: RedisBroker) -> None:
        self._b = broker
        self._keys = (broker.key("engines"), broker.key("engines:expiry"))

    def register(self, info: EngineInfo, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        doc = msgspec.json.encode(msgspec.structs.replace(info, heartbeat_s=time.time()))
        self._b.eval_many(_REGISTER, [(self._keys, (info.engine_id, doc, float(ttl_s)))])

    def deregister(self, engine_id: str) -> None:
        def run() -> list[Any]:
            pipe = self._b.client.pipeline(transaction=True)
            pipe.hdel(self._keys[0], engine_id)
            pipe.zrem(self._keys[1], engine_id)
            return pipe.execute()

        self._b.call(run, "deregister engine")

    def live(self) -> list[EngineInfo]:
        docs = self._b.eval_many(_LIVE, [(self._keys, ())])[0]
        infos = [msgspec.json.decode(d, type=EngineInfo) for d in docs if d is not None]
        return sorted(infos, key=lambda e: e.engine_id)


class RedisRunState(RunState):
    def __init__(self, broker: RedisBroker) -> None:
        self._b = broker
        self._key = broker.key("state")

    def get(self, key: str) -> str | None:
        value = self._b.call(lambda: self._b.client.hget(self._key, key), "HGET state")
        return None if value is None else _text(value)

    def set(self, key: str, value: str) -> None:
        self._b.call(lambda: self._b.client.hset(self._key, key, value), "HSET state")

    def incr(self, key: str, amount: int = 1) -> int:
        return int(self._b.call(lambda: self._b.client.hincrby(self._key, key, amount), "HINCRBY state"))

    def all(self) -> dict[str, str]:
        items = self._b.call(lambda: self._b.client.hgetall(self._key), "HGETALL state")
        return {_text(k): _text(v) for k, v in items.items()}


class RedisBroker(Broker):
    """The queues and keys of one run on one Redis (redis://, rediss:// with user:password, unix://); the password
    may instead come from `redis_password_file` or `redis_password_env`."""

    def __init__(self, config: BrokerConfig) -> None:
        if not config.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"--broker.redis_url: {redact_url(config.redis_url)!r} must start with redis://, rediss://, "
                "unix:// or memory://"
            )
        self.config = config
        self.run_id = config.run_id
        self.url = redact_url(config.redis_url)
        # From a file or the environment, so that it is in neither argv nor the URL (which errors and logs
        # print redacted anyway).
        password = config.redis_password()
        self.client = redis.Redis.from_url(
            config.redis_url,
            **({"password": password} if password is not None else {}),
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),  # retries are ours (below), bounded by a deadline
            driver_info=None,  # no CLIENT SETINFO: Redis 6.2 does not know it
        )
        self._retry: RetryPolicy = config.retry.policy()
        # How often a reader looks for idle entries of dead consumers, and the longest single block of a
        # blocking read (under the socket timeout, so a block never reads as a dead connection).
        self.claim_interval_s = min(config.claim_idle_s, 1.0)
        self.block_chunk_s = min(self.claim_interval_s, config.socket_timeout_s / 2)
        self.policy_version = RedisPolicyVersion(self)
        self.engines = RedisEngineRegistry(self)
        self.state = RedisRunState(self)
        self.call(self.client.ping, "PING")

    def key(self, name: str) -> str:
        return f"longtrace:{{{self.run_id}}}:{name}"

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one round trip, retrying on a lost connection or timeout; wrong credentials fail at once."""

        def attempt() -> T:
            try:
                return fn()
            except redis.AuthenticationError as e:  # a ConnectionError subclass, but retrying cannot help
                raise BrokerError(f"Redis at {self.url} refused the credentials: {e}") from e
            except ResponseError as e:  # an error reply (OOM, wrong type, ...): retrying cannot help either
                raise BrokerError(f"{what} on {self.url}: {e}") from e

        try:
            return self._retry.call(attempt, _RETRY_ON, f"{what} on {self.url}")
        except _RETRY_ON as e:
            raise BrokerError(f"{what} on {self.url} failed after retries: {e!r}") from e

    def eval_many(self, script: _Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Run `script` once per (keys, args) in one pipelined round trip; load it if Redis lost it (restart)."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(3):

            def run(todo: list[int] = todo) -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                return pipe.execute(raise_on_error=False)

            missing = []
            for i, r in zip(todo, self.call(run, f"script {script.name}"), strict=True):
                if isinstance(r, NoScriptError):
                    missing.append(i)
                elif isinstance(r, ResponseError):
                    raise BrokerError(f"script {script.name} failed on {self.url}: {r}")
                else:
                    results[i] = r
            if not missing:
                return results
            self.call(lambda: self.client.script_load(script.source), f"SCRIPT LOAD {script.name}")
            todo = missing
        raise BrokerError(f"script {script.name} kept disappearing from {self.url} (SCRIPT FLUSH in a loop?)")

    def producer(self, stream: str, kind: type[M]) -> Producer[M]:
        _check_stream(stream)
        return RedisProducer(self, stream, kind)

    def consumer(self, stream: str, kind: type[M], group: str, name: str) -> Consumer[M]:
        _check_stream(stream)
        key = self.key(stream)

        def create() -> None:
            try:
                self.client.xgroup_create(key, group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

        self.call(create, "XGROUP CREATE")
        groups = [_text(g["name"]) for g in self.call(lambda: self.client.xinfo_groups(key), "XINFO GROUPS")]
        if groups != [group]:
            raise ValueError(
                f"stream {stream!r} has consumer groups {groups}: one group per stream (acked entries are "
                f"deleted), so {group!r} cannot share it"
            )
        return RedisConsumer(self, stream, kind, group, name)

    def close(self) -> None:
        self.client.close()
