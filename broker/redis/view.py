"""The Redis backend's read-only view of a stream (`Broker.view`): XRANGE, XLEN, XINFO and a SCAN of the dedup
keys, never XREADGROUP, XCLAIM or XACK, so the consumer group's state is exactly what it would be without it."""

from __future__ import annotations

import functools
from typing import Any

from broker.base import Entry, GroupStats, Holder, Page, StreamStats, StreamView, Undecodable, parse_entry_id
from broker.entries import decode_entry
from broker.redis.connection import Connection
from broker.redis.layout import FIELD, no_payload_reason, text
from broker.schemas import M


class RedisStreamView(StreamView):
    def __init__(self, conn: Connection, stream: str) -> None:
        self._c = conn
        self._stream = stream
        self._key = conn.keys.key(stream)

    def peek(self, kind: type[M], after_id: str = "0-0", count: int = 100) -> Page[M]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        parse_entry_id(after_id)
        # "(" makes the range start exclusive (Redis >= 6.2).
        xrange = functools.partial(self._c.client.xrange, self._key, "(" + after_id, "+", count)
        reply: Any = self._c.call(xrange, f"XRANGE {self._stream}")
        entries: list[Entry[M]] = []
        undecodable: list[Undecodable] = []
        last_id = after_id
        for raw_id, fields in reply:
            last_id = text(raw_id)
            payload = fields.get(FIELD)
            got = no_payload_reason(fields) if payload is None else decode_entry(payload, kind)
            if isinstance(got, str):
                undecodable.append(Undecodable(last_id, got))
            else:
                entries.append(Entry(last_id, got, 0))
        return Page(entries, undecodable, last_id)

    def stats(self) -> StreamStats:
        length, groups = self._c.length_and_groups(self._key)
        names = [text(g["name"]) for g in groups]

        def consumers() -> list[Any]:
            pipe = self._c.client.pipeline(transaction=False)
            for name in names:
                pipe.xinfo_consumers(self._key, name)
            return pipe.execute()

        per_group = self._c.call(consumers, f"XINFO CONSUMERS {self._stream}") if names else []
        return StreamStats(
            length=length,
            groups={
                name: GroupStats(
                    pending=int(g["pending"]),
                    holders={
                        text(c["name"]): Holder(pending=int(c["pending"]), idle_s=int(c["idle"]) / 1000)
                        for c in cs
                        if int(c["pending"]) > 0
                    },
                )
                for name, g, cs in zip(names, groups, per_group, strict=True)
            },
        )

    def dedup_keys(self) -> set[str]:
        head = len(self._c.keys.dedup(self._stream, ""))
        pattern = self._c.keys.dedup_pattern(self._stream)
        keys = self._c.call(lambda: list(self._c.client.scan_iter(match=pattern, count=1000)), "SCAN dedup keys")
        return {text(k)[head:] for k in keys}
