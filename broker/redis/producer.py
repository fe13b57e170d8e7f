"""The Redis backend's producer: idempotent, backpressured publishing to one stream.

Idempotency: each message with a dedup key is added by a transaction that SETs the key and XADDs the message,
under a WATCH of the key after a check that it is not set, so neither a crash nor a retry after a lost reply
can lose or double a message. Without a dedup key a publish that is retried after its reply was lost may append
the message twice (at-least-once).

Backpressure: a producer adds only as many entries as fit under `max_backlog` undelivered ones (XLEN minus the
pending counts of XINFO GROUPS) and polls both while the stream is full. Entries a consumer holds do not count
(see broker.base). Neither is watched (consumers change them all the time), so producers publishing at the same
instant may overshoot the limit by their batches.

A publish of a few or large messages takes one round trip while the stream has room (`_publish_at_once`: the
checks run in a script per message, between its WATCH and its MULTI); two after it found the stream full, and
for a bulk of small messages (`_publish_checked`: read the keys and the backlog, then one MULTI). Payloads are encoded into reused buffers and never pass through Lua.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ResponseError

from broker.base import BackpressureTimeout, Producer, check_entry_sizes
from broker.redis.connection import Connection, groups_reply
from broker.redis.layout import FIELD, text
from broker.redis.scripts import PUBLISH_CHECK
from broker.schemas import M, encode_into

log = logging.getLogger(__name__)

# The encoding buffers a producer keeps per thread for its next publish: at most this many, of at most this size.
_KEEP_BUFFERS = 64
# The one-round-trip publish is for batches of at most this many messages, or of this many bytes per message.
_AT_ONCE_FEW = 16
_AT_ONCE_LARGE = 64 * 1024
_KEEP_BYTES = 16 * 2**20


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
    A stream that does not exist yet has no groups: nothing is pending then."""
    pending = 0
    for g in groups_reply(groups):
        pairs = g.items() if isinstance(g, dict) else zip(g[::2], g[1::2], strict=True)
        pending += next(int(v) for k, v in pairs if text(k) == "pending")
    return max(0, int(xlen) - pending)


class RedisProducer(Producer[M]):
    def __init__(self, conn: Connection, stream: str, kind: type[M]) -> None:
        self._c = conn
        self._stream = stream
        self._key = conn.keys.key(stream)
        self.kind: type[M] = kind
        self._buffers = threading.local()  # encoding buffers, reused by each thread's next publish
        self._at_once = True  # whether the next attempt goes in one round trip (see _publish_some)

    def publish(
        self, msgs: Sequence[M], dedup_key: Callable[[M], str] | None = None, timeout_s: float | None = None
    ) -> list[str | None]:
        cfg = self._c.config
        timeout_s = cfg.backpressure_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        payloads = self._encode(msgs)
        check_entry_sizes(self._stream, payloads, cfg.max_entry_mb)
        keys = [self._c.keys.dedup(self._stream, dedup_key(m)) for m in msgs] if dedup_key else None
        ids: list[str | None] = [None] * len(msgs)
        todo = list(range(len(msgs)))
        while todo:
            done = self._c.call(
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

    def _encode(self, msgs: Sequence[M]) -> list[bytearray]:
        """Encode into this thread's reused buffers (bytearray, which redis-py sends without a copy): a fresh
        0.5 MB bytes per message costs ~6x msgspec's own encoding time in first-touch page faults (glibc hands
        big freed blocks back to the OS). Valid until this thread's next publish; a buffer that grew over
        `_KEEP_BYTES` is not kept."""
        bufs: list[bytearray] = self._buffers.__dict__.setdefault("bufs", [])
        while len(bufs) < len(msgs):
            bufs.append(bytearray())
        out = bufs[: len(msgs)]
        for j, m in enumerate(msgs):
            try:
                encode_into(m, out[j])
            except BufferError:  # still exported (a view kept by a traceback?): it cannot be resized, use a new one
                out[j] = bufs[j] = bytearray()
                encode_into(m, out[j])
        bufs[:] = [b for b in bufs if len(b) <= _KEEP_BYTES][:_KEEP_BUFFERS]
        return out

    def _publish_some(
        self, todo: list[int], payloads: list[bytearray], keys: list[str] | None
    ) -> dict[int, str | None] | None:
        """One optimistic attempt on one connection: the messages it settled (entry id, or None for a duplicate);
        the rest found the stream full, or their dedup key written concurrently, and are tried again. None when
        the EXEC of `_publish_checked` aborted because a dedup key of ours was published concurrently.

        One round trip (`_publish_at_once`) while the last attempt found room; two (`_publish_checked`) after
        one found the stream full, so that a full stream is not sent payloads in vain, and where
        `_goes_at_once` says so.
        """
        client = self._c.client
        conn: Any = client.connection_pool.get_connection()
        try:
            if self._goes_at_once(todo, payloads, keys):
                return self._publish_at_once(conn, todo, payloads, keys)
            return self._publish_checked(conn, todo, payloads, keys)
        except BaseException:
            conn.disconnect()  # it may hold a WATCH or unread replies: never hand it back as is
            raise
        finally:
            client.connection_pool.release(conn)

    def _goes_at_once(self, todo: list[int], payloads: list[bytearray], keys: list[str] | None) -> bool:
        """Whether this attempt takes the one-round-trip path: the last one found room, no dedup key is named
        twice (the per-message checks cannot see that), and the messages are few or large. A bulk of small
        ones is cheaper in two round trips: the check script costs Redis ~30 us per message, and one MULTI
        costs little AOF work when the payloads are small."""
        if not self._at_once or (keys is not None and len({keys[i] for i in todo}) < len(todo)):
            return False
        return len(todo) <= _AT_ONCE_FEW or sum(len(payloads[i]) for i in todo) >= _AT_ONCE_LARGE * len(todo)

    def _adds(self, todo: list[int], payloads: list[bytearray], keys: list[str] | None) -> list[tuple[Any, ...]]:
        """The commands of a transaction that publishes `todo`: (SET dedup key, XADD) or XADD per message."""
        ttl_ms = int(self._c.config.dedup_ttl_s * 1000)
        cmds: list[tuple[Any, ...]] = []
        for i in todo:
            if keys is not None:
                cmds.append(("SET", keys[i], b"1", "PX", ttl_ms))
            cmds.append(("XADD", self._key, "*", FIELD, payloads[i]))
        return cmds

    def _publish_at_once(
        self, conn: Any, todo: list[int], payloads: list[bytearray], keys: list[str] | None
    ) -> dict[int, str | None]:
        """All of `todo` in one round trip, one transaction per message: [WATCH the guards and its dedup key,
        EVAL PUBLISH_CHECK, MULTI, SET dedup key, XADD, EXEC] each. The script refuses (by writing a watched
        guard, which aborts the EXEC) a duplicate, and stops the rest once one does not fit under the backlog
        limit; a concurrent publish of the dedup key aborts the EXEC too. Returns the messages it settled (the
        rest are tried again), in order but for those whose key another producer wrote meanwhile.

        One transaction per message, not one for all: with the AOF on, Redis buffers a whole transaction's
        AOF record before writing it, and a MULTI of 8 x 0.5 MB XADDs doubled Redis's CPU time per message
        (the two-round-trip path, which is one MULTI, pays that; it runs only after a refusal here). The
        guarantees are those of `_publish_checked`; only the payloads of a refused message are sent in vain.
        """
        guard = self._c.keys.key(f"publish-guard:{uuid.uuid4().hex}")  # per attempt: writing it aborts its watchers
        stop, skip = guard + ":stop", guard + ":skip"
        max_backlog = self._c.config.max_backlog
        cmds: list[tuple[Any, ...]] = [("DEL", stop)]
        prev: list[str] = []
        for n in todo:
            key: list[str] = [keys[n]] if keys is not None else []
            check = (
                "EVAL",
                PUBLISH_CHECK.source,
                3 + len(key) + len(prev),
                stop,
                skip,
                self._key,
                *key,
                *prev,
                max_backlog,
            )
            cmds += [("WATCH", stop, skip, *key), check, ("MULTI",)]
            cmds += self._adds([n], payloads, keys)
            cmds.append(("EXEC",))
            prev = key
        replies = _read_replies(conn, [*cmds, ("DEL", stop)])
        per = 4 + (2 if keys is not None else 1)
        settled: dict[int, str | None] = {}
        for j, i in enumerate(todo):
            mine = replies[1 + j * per : 1 + (j + 1) * per]
            verdict, result = mine[1], mine[-1]
            if isinstance(result, ResponseError):  # EXECABORT: the error queueing a command (OOM, ...) says more
                raise next(r for r in mine if isinstance(r, ResponseError))
            if result is None:
                if verdict == 0:
                    settled[i] = None
                elif verdict != 1:
                    self._at_once = False  # no room (or an error): the next attempts look first
                continue
            if verdict != 1:  # the check failed without refusing: cannot happen unless Redis itself failed it
                log.error("publish to %s ran without its check (%r)", self._stream, verdict)
            added = result[-1]
            if isinstance(added, Exception):
                raise added
            settled[i] = text(added)
        return settled

    def _publish_checked(
        self, conn: Any, todo: list[int], payloads: list[bytearray], keys: list[str] | None
    ) -> dict[int, str | None] | None:
        """Two round trips: [WATCH dedup keys, MGET them, XLEN, XINFO GROUPS], then [MULTI, (SET key, XADD) per
        new message that fits under the backlog limit, EXEC]. Returns as `_publish_some`.

        The MULTI makes SET and XADD one unit, so a crash or a retry after a lost reply can neither lose nor
        double a message. (A Lua script per message would do the same, but Redis copies each payload
        twice more on the way into Lua and back: about 430 us of server time per 640 KB group here,
        which cut the benchmark's ratio to raw redis-py to 0.55-0.75.)
        """
        first: list[tuple[Any, ...]] = [("XLEN", self._key), ("XINFO", "GROUPS", self._key)]
        if keys is not None:
            batch_keys: list[str] = [keys[i] for i in todo]
            first = [("WATCH", *batch_keys), ("MGET", *batch_keys), *first]
        replies = _read_replies(conn, first)
        for r in replies[:-1]:
            if isinstance(r, ResponseError):
                raise r
        room = self._c.config.max_backlog - _undelivered(replies[-2], replies[-1])
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
        # The next attempt goes at once only if this one was all new and a batch as large fits again after it.
        self._at_once = len(fresh) == len(todo) and room - len(fresh) >= len(todo)
        if not fresh:
            if keys is not None:
                _round_trip(conn, [("UNWATCH",)])
            return settled
        if keys is None:
            added = _round_trip(conn, self._adds(fresh, payloads, keys))
        else:
            result = _round_trip(conn, [("MULTI",), *self._adds(fresh, payloads, keys), ("EXEC",)])[-1]
            if result is None:
                return None
            added = result[1::2]
        for r in added:
            if isinstance(r, Exception):
                raise r
        settled.update((i, text(r)) for i, r in zip(fresh, added, strict=True))
        return settled

    def _wait_for_room(self, deadline: float, timeout_s: float, done: int, total: int) -> None:
        """Poll the undelivered count (cheap, unlike resending payloads) until the stream is below its limit."""
        sleep_s = 0.002
        max_backlog = self._c.config.max_backlog
        while self.undelivered() >= max_backlog:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackpressureTimeout.waited(self._stream, max_backlog, timeout_s, done, total)
            time.sleep(min(sleep_s, left))
            sleep_s = min(sleep_s * 2, 0.05)

    def backlog(self) -> int:
        return int(self._c.call(lambda: self._c.client.xlen(self._key), "XLEN"))

    def undelivered(self) -> int:
        return _undelivered(*self._c.length_and_groups(self._key))
