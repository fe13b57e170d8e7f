"""The Redis backend's small shared state: the policy version, the engine registry and the run state.

Policy version: an integer key plus a tiny notification stream that every change appends to, both written by
one Lua script (so compare-and-set is atomic); `wait_for_change` blocks on the stream in chunks and re-reads
the key after each. Engine registry: a hash of EngineInfo JSON plus a sorted set of expiry times on the Redis
server's clock (no clock sync between hosts). Run state: one hash of strings.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import msgspec

from broker.base import EngineInfo, EngineRegistry, PolicyVersion, RunState
from broker.redis.connection import Connection
from broker.redis.layout import text
from broker.redis.scripts import LIVE, REGISTER, SET_VERSION


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
