"""Routing replay's transport (R3, MoE models): the engine's routed experts of each sample, stored beside its group.

At 128K tokens x 48 MoE layers x top-8 one sample's routing is tens of MB: far too large for a queue entry. The
rollout worker stores each sample's routing ([prompt + response tokens - 1, moe layers, topk] flattened, as SGLang's
`meta_info.routed_experts` decodes, re-encoded in the narrowest integer type that holds the ids: one byte per id up
to 256 experts, a quarter of SGLang's int32; `encode_routing`) under its own key of the run,
`longtrace:{<run_id>}:routing:<group_id>:<nonce>:<sample index>`, with a TTL (`--sampling.routing_ttl_s`), before it
publishes the group; the group's `Sample.routing_key` names that key. The nonce is per generation of the group: a
task generated twice (redelivered) never overwrites the routing an already published entry refers to; the
worker deletes the keys of a generation it did not publish (deduplicated, dead-lettered).

The learner (learner/scored_reader.py) reads a group's keys in one MGET when it reads the entry, checks each shape
against the sample's tokens (a missing or misshapen routing dead-letters the group), and deletes the keys once the
entry is acked (after the checkpoint that decided the group): a restart before that reads them again. The TTL is
the backstop for keys no one deletes (a group dropped upstream, a crashed worker).

Every call goes through the broker's connection (`Connection.call`: socket timeouts, bounded retries).
"""

from __future__ import annotations

import abc
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from broker.base import Broker

ROUTING_DTYPE = np.dtype("<i4")  # SGLang's meta_info.routed_experts
# A stored value: one tag byte naming the ids' type, then the ids. The learner holds them as int16 (-1: no replay).
_STORED_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<i4")}
LEARNER_DTYPE: np.dtype[np.int16] = np.dtype("<i2")


class RoutingError(ValueError):
    """A sample's routing is missing or does not fit its tokens: the group cannot be trained with replay."""


class RoutingStore(abc.ABC):
    """Binary values under run-scoped keys, with a TTL: where the samples' routing lives between worker and learner."""

    @abc.abstractmethod
    def key(self, name: str) -> str:
        """The full key of `name` in the run's namespace."""

    @abc.abstractmethod
    def put(self, values: dict[str, bytes], ttl_s: float) -> None:
        """Set every key (one round trip), each expiring after `ttl_s`."""

    @abc.abstractmethod
    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys` (one round trip); None where a key does not exist (expired, deleted, never set)."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[str]) -> None: ...

    def new_keys(self, group_id: str, num_samples: int) -> list[str]:
        """Fresh keys for one generation of a group's samples."""
        nonce = uuid.uuid4().hex[:12]
        return [self.key(f"routing:{group_id}:{nonce}:{i}") for i in range(num_samples)]


class RedisRoutingStore(RoutingStore):
    def __init__(self, broker: Broker) -> None:
        from broker.redis.backend import RedisBroker

        assert isinstance(broker, RedisBroker)
        self._broker = broker

    def key(self, name: str) -> str:
        return self._broker.key(name)

    def put(self, values: dict[str, bytes], ttl_s: float) -> None:
        if not values:
            return
        client, ttl_ms = self._broker.client, max(1, int(ttl_s * 1000))

        def run() -> None:
            pipe = client.pipeline(transaction=False)
            for k, v in values.items():
                pipe.set(k, v, px=ttl_ms)
            pipe.execute()

        self._broker.conn.call(run, f"SET {len(values)} routing keys")

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        client = self._broker.client
        got = self._broker.conn.call(lambda: list(client.mget(list(keys))), f"MGET {len(keys)} routing keys")
        return [v.encode() if isinstance(v, str) else v for v in got]  # bytes: the client does not decode

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            client = self._broker.client
            self._broker.conn.call(lambda: client.unlink(*keys), f"UNLINK {len(keys)} routing keys")


class MemoryRoutingStore(RoutingStore):
    """The in-process broker's counterpart (memory://): a dict per store, expiring by the monotonic clock."""

    _stores: weakref.WeakKeyDictionary[object, dict[str, tuple[bytes, float]]] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, broker: Broker) -> None:
        from broker.memory.backend import MemoryBroker

        assert isinstance(broker, MemoryBroker)
        self._run_id = broker.run_id
        with self._lock:  # one dict per MemoryStore, shared by every broker over it (worker and learner)
            self._values = self._stores.setdefault(broker.store, {})

    def key(self, name: str) -> str:
        return f"longtrace:{{{self._run_id}}}:{name}"

    def put(self, values: dict[str, bytes], ttl_s: float) -> None:
        expires = time.monotonic() + ttl_s
        with self._lock:
            self._values.update({k: (v, expires) for k, v in values.items()})

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        with self._lock:
            got = [self._values.get(k) for k in keys]
        return [v[0] if v is not None and v[1] > now else None for v in got]

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for k in keys:
                self._values.pop(k, None)


def routing_store(broker: Broker) -> RoutingStore:
    """The routing store beside `broker`'s run (Redis or in-process)."""
    from broker.memory.backend import MemoryBroker

    return MemoryRoutingStore(broker) if isinstance(broker, MemoryBroker) else RedisRoutingStore(broker)


def encode_routing(raw: bytes) -> bytes:
    """SGLang's routed experts (little-endian int32 ids) as a stored value: the narrowest type that holds them."""
    ids = np.frombuffer(raw, dtype=ROUTING_DTYPE)
    low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    tag = 4 if low < 0 else 1 if high < 2**8 else 2 if high < 2**16 else 4
    return bytes([tag]) + (raw if tag == 4 else ids.astype(_STORED_DTYPES[tag]).tobytes())


def decode_routing(value: bytes | None, key: str, num_inputs: int, shape: tuple[int, int]) -> npt.NDArray[np.int16]:
    """A stored routing as int16 [num_inputs, moe layers, topk] (`shape`: the model's moe layers and topk);
    RoutingError when it is missing or does not have exactly that shape."""
    if value is None:
        raise RoutingError(f"routing {key} is missing (expired past --sampling.routing_ttl_s, or deleted)")
    dtype = _STORED_DTYPES.get(value[0]) if value else None
    if dtype is None:
        raise RoutingError(f"routing {key}: not a stored routing (type tag {value[:1]!r})")
    layers, topk = shape
    want = num_inputs * layers * topk * dtype.itemsize
    if len(value) - 1 != want:
        raise RoutingError(
            f"routing {key}: {len(value) - 1} bytes do not fit {num_inputs} input tokens x {layers} moe layers x "
            f"top-{topk} {dtype.name} ({want} bytes)"
        )
    ids = np.frombuffer(value, dtype=dtype, offset=1)
    if ids.size and int(ids.max()) > np.iinfo(LEARNER_DTYPE).max:
        raise RoutingError(f"routing {key}: expert id {int(ids.max())} beyond int16")
    out: npt.NDArray[np.int16] = ids.reshape(num_inputs, layers, topk).astype(LEARNER_DTYPE)
    return out
