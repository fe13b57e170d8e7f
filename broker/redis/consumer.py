"""The Redis backend's consumer: one named consumer of a stream's consumer group.

Read order: this consumer's own pending entries first (after a restart, or a lost XREADGROUP reply), then
entries idle longer than `claim_idle_s` in other consumers (XPENDING IDLE + XCLAIM), then new ones. Entries it
holds are never handed out again; their lease is renewed every `claim_idle_s / 4`, by `touch` and by every read
(a blocking read wakes up for it), long before another consumer may claim them, and only while this consumer
still holds them (the RENEW script). A stream is a queue: ack is XACK and XDEL in one MULTI, so XLEN is the
backlog. Undecodable and over-delivered entries are buried: moved to the dead stream with their reason by one
Lua script (broker.redis.scripts.BURY), only while still pending.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from broker.base import DEAD, Consumer, Entry, read_deadline
from broker.entries import dead_letter, triage
from broker.redis.connection import RETRY_ON, Connection
from broker.redis.layout import FIELD, no_payload_reason, text
from broker.redis.scripts import BURY, Script
from broker.schemas import M, encode
from common.logs import warn_once

log = logging.getLogger(__name__)

# A delivered entry before triage: id, its fields (None when it was deleted while pending), delivery count.
_Raw = tuple[str, dict[bytes, bytes] | None, int]


# KEYS: stream; ARGV: group, consumer, entry ids. -> the ids renewed. XCLAIM JUSTID resets an entry's idle time
# without counting a delivery, but it also takes the entry from whoever holds it: only the entries still pending
# to this consumer are renewed, so one whose lease ran out and was claimed by another stays with that one.
RENEW = Script(
    "renew",
    """
local renewed = {}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed[#renewed + 1] = ARGV[i]
  end
end
return renewed
""",
)


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The (id, fields) pairs of an XREADGROUP/XREAD reply on one stream."""
    if not reply:
        return []
    return list(reply[0][1])


class RedisConsumer(Consumer[M]):
    def __init__(self, conn: Connection, stream: str, kind: type[M], group: str, name: str) -> None:
        self._c = conn
        self._stream = stream
        self._key = conn.keys.key(stream)
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
        self._next_renew_s = 0.0  # the next lease renewal of the held entries (touch or read)
        self._renew_every_s = conn.config.claim_idle_s / 4  # the contract: Consumer.touch

    def touch(self) -> None:
        with self._lock:
            self._renew_due()

    def _renew_due(self) -> None:
        """Renew the lease of every held entry if the last renewal is `claim_idle_s / 4` old (lock held)."""
        now = time.monotonic()
        if now < self._next_renew_s:
            return
        self._next_renew_s = now + self._renew_every_s
        self._renew(sorted(self._delivered))

    def _renew(self, ids: list[str]) -> None:
        """Reset the idle time of `ids` that this consumer still holds; forget the others (claimed by another
        consumer after their lease ran out, or acked by it)."""
        if not ids:
            return
        [renewed] = self._c.eval_many(RENEW, [((self._key,), (self.group, self.name, *ids))])
        lost = (set(ids) - {text(i) for i in renewed}) & self._delivered  # not those acked meanwhile
        if lost:
            self._delivered.difference_update(lost)
            log.warning(
                "%s lost %d entries of %s to another consumer (held past claim_idle_s without renewal): %s",
                self.name, len(lost), self._stream, ", ".join(sorted(lost)[:5]),
            )  # fmt: skip

    def read(self, count: int, block_s: float | None = None) -> list[Entry[M]]:
        deadline = read_deadline(count, block_s, self._c.config.block_s)
        with self._lock:
            while True:
                self._renew_due()
                raw = self._take(count, deadline)
                entries = self._triage(raw)
                if entries or (not raw and time.monotonic() >= deadline):
                    return entries

    def _take(self, count: int, deadline: float) -> list[_Raw]:
        """Deliver up to `count` raw entries; a blocking read of new ones wakes up for the next lease renewal."""
        if self._recover_from is not None:
            got = self._read_own_pending(count)
            if got:
                return got
        if time.monotonic() >= self._next_claim_s:
            got = self._claim_idle(count)
            if got:
                return got
        wake = min(deadline, self._next_renew_s) if self._delivered else deadline
        return self._read_new(count, min(wake - time.monotonic(), self._c.block_chunk_s))

    def _read_own_pending(self, count: int) -> list[_Raw]:
        start = self._recover_from
        assert start is not None
        reply = self._c.call(
            lambda: self._c.client.xreadgroup(self.group, self.name, {self._key: start}, count=count), "XREADGROUP 0"
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
        time. Those are renewed instead (they are idle this long only when a renewal came late).
        """
        idle_ms = int(self._c.config.claim_idle_s * 1000)
        # Paged: the pending list holds what consumers hold besides the backlog (the learner: a checkpoint's worth).
        page = max(self._c.config.max_backlog, count)
        rows: list[Any] = []
        start = "-"
        while True:
            got: Any = self._c.call(
                functools.partial(self._c.client.xpending_range, self._key, self.group, start, "+", page, idle=idle_ms),
                "XPENDING",
            )
            rows += got
            if len(got) < page:
                break
            start = "(" + text(got[-1]["message_id"])  # exclusive range start (Redis >= 6.2)
        held = [text(r["message_id"]) for r in rows if self._holds(r)]
        theirs = {r["message_id"]: r["times_delivered"] for r in rows if not self._holds(r)}
        self._renew(held)
        if not theirs:
            self._next_claim_s = time.monotonic() + self._c.claim_interval_s
            return []
        ids = list(theirs)[:count]
        # min idle again: an entry claimed by another consumer in between is skipped, not stolen back.
        claimed: Any = self._c.call(
            lambda: self._c.client.xclaim(self._key, self.group, self.name, idle_ms, ids), "XCLAIM"
        )
        pairs = [(i, f) for i, f in claimed if i is not None]
        if len(pairs) < len(claimed):
            # Redis 6.2 keeps deleted entries in the PEL; ours never are (ack deletes atomically).
            warn_once(log, f"XCLAIM on {self._key!r} met pending entries that were deleted outside the broker")
        if pairs:
            log.info("%s claimed %d idle entries of %s", self.name, len(pairs), self._stream)
        else:
            self._next_claim_s = time.monotonic() + self._c.claim_interval_s
        return [(text(i), f, theirs[i] + 1) for i, f in pairs]

    def _holds(self, row: Any) -> bool:
        """An XPENDING row of an entry this consumer holds (handed out, not acked, not claimed away)."""
        return text(row["consumer"]) == self.name and text(row["message_id"]) in self._delivered

    def _delivery_counts(self, ids: list[bytes]) -> list[int]:
        def run() -> list[Any]:
            pipe = self._c.client.pipeline(transaction=False)
            for i in ids:
                pipe.xpending_range(self._key, self.group, i, i, 1, consumername=self.name)
            return pipe.execute()

        # An id claimed away by another consumer in between has no row here: count it as one delivery more.
        return [rows[0]["times_delivered"] if rows else 1 for rows in self._c.call(run, "XPENDING")]

    def _read_new(self, count: int, block_s: float) -> list[_Raw]:
        block_ms = int(block_s * 1000)

        def run() -> Any:
            try:
                return self._c.client.xreadgroup(
                    self.group, self.name, {self._key: ">"}, count=count, block=block_ms if block_ms > 0 else None
                )
            except RETRY_ON:
                # The reply may be lost after Redis delivered entries to us: re-read own pending ones.
                self._recover_from = "0"
                raise

        return [(i.decode(), f, 1) for i, f in _entries(self._c.call(run, "XREADGROUP"))]

    def _triage(self, raw: list[_Raw]) -> list[Entry[M]]:
        """Decode; entries that are undecodable (no payload field included) or delivered too often go to `dead`,
        deleted ones are acked."""
        out: list[Entry[M]] = []
        dead: list[tuple[str, bytes, int, str]] = []
        gone: list[str] = []
        max_deliveries = self._c.config.max_deliveries
        for entry_id, fields, n in raw:
            if fields is None:  # deleted while pending (outside the broker): nothing left to give up on
                gone.append(entry_id)
                continue
            payload = fields.get(FIELD)
            if payload is None:
                # A foreign producer's entry: keep all its fields (msgpack map) so the letter shows what came.
                dead.append((entry_id, msgspec.msgpack.encode(fields), n, no_payload_reason(fields)))
                continue
            got = triage(payload, n, self.kind, max_deliveries)
            if isinstance(got, str):
                dead.append((entry_id, payload, n, got))
            else:
                out.append(Entry(entry_id, got, n))
        if dead:
            self._bury(dead)
        if gone:
            self.ack(gone)
        self._delivered.update(e.id for e in out)
        return out

    def _bury(self, items: list[tuple[str, bytes, int, str]]) -> None:
        dead_key = self._c.keys.key(DEAD)
        calls = []
        for entry_id, payload, n, reason in items:
            letter = dead_letter(self._stream, entry_id, payload, n, reason, self.name)
            calls.append(((self._key, dead_key), (self.group, entry_id, encode(letter))))
        num_buried = 0
        for (entry_id, _, n, reason), buried in zip(items, self._c.eval_many(BURY, calls), strict=True):
            self._delivered.discard(entry_id)
            if buried:
                num_buried += 1
                log.warning("dead letter %s/%s after %d deliveries: %s", self._stream, entry_id, n, reason)
        if num_buried:
            # The dead stream's cap (BrokerConfig.dead_max_entries, its policy there): the oldest letters go,
            # approximately (whole stream nodes), as XADD MAXLEN ~ would.
            cap = self._c.config.dead_max_entries
            self._c.call(lambda: self._c.client.xtrim(dead_key, maxlen=cap, approximate=True), "XTRIM dead")

    def ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return

        def run() -> list[Any]:
            pipe = self._c.client.pipeline(transaction=True)
            pipe.xack(self._key, self.group, *ids)
            pipe.xdel(self._key, *ids)
            return pipe.execute()

        self._c.call(run, "XACK+XDEL")
        self._delivered.difference_update(ids)

    def dead_letter(self, entry: Entry[M], reason: str) -> None:
        # No lock: a read blocked in another thread must not delay giving up on an entry.
        self._bury([(entry.id, encode(entry.msg), entry.delivery_count, reason)])
