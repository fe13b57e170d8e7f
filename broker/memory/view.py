"""The in-process backend's read-only view of a stream (`Broker.view`): it reads the store under its lock and
changes nothing, as the Redis backend's XRANGE/XINFO view."""

from __future__ import annotations

import time

from broker.base import Entry, GroupStats, Holder, Page, StreamStats, StreamView, Undecodable, parse_entry_id
from broker.entries import decode_entry
from broker.memory.store import RunStore
from broker.schemas import M


class MemoryStreamView(StreamView):
    def __init__(self, run: RunStore, stream: str) -> None:
        self._r = run
        self._stream = stream

    def peek(self, kind: type[M], after_id: str = "0-0", count: int = 100) -> Page[M]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        after = parse_entry_id(after_id)
        with self._r.store.cond:
            s = self._r.stream(self._stream)
            # Ids increase in insertion order (StreamState.append), as in a Redis stream.
            rows = [(i, p) for i, p in s.entries.items() if parse_entry_id(i) > after][:count]
        entries: list[Entry[M]] = []
        undecodable: list[Undecodable] = []
        for entry_id, payload in rows:
            got = decode_entry(payload, kind)
            if isinstance(got, str):
                undecodable.append(Undecodable(entry_id, got))
            else:
                entries.append(Entry(entry_id, got, 0))
        return Page(entries, undecodable, rows[-1][0] if rows else after_id)

    def stats(self) -> StreamStats:
        now = time.monotonic()
        with self._r.store.cond:
            s = self._r.stream(self._stream)
            holders: dict[str, Holder] = {}
            for p in s.pending.values():
                held = holders.get(p.consumer)
                idle_s = now - p.delivered_s
                holders[p.consumer] = (
                    Holder(1, idle_s) if held is None else Holder(held.pending + 1, min(held.idle_s, idle_s))
                )
            groups = {} if s.group is None else {s.group: GroupStats(len(s.pending), holders)}
            return StreamStats(length=len(s.entries), groups=groups)

    def dedup_keys(self) -> set[str]:
        now = time.monotonic()
        with self._r.store.cond:
            return {k for k, expiry in self._r.stream(self._stream).dedup.items() if expiry > now}
