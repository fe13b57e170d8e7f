"""The in-process backend's small shared state: policy version, engine registry (expiry on the monotonic clock),
run state and run marker, per run in a `MemoryStore`."""

from __future__ import annotations

import time
import weakref

import msgspec

from broker.base import EngineInfo, EngineRegistry, PolicyVersion, RunMarker, RunState
from broker.memory.store import MemoryStore, RunStore

# The run markers of each store, by run id (beside the store, whose data never outlives the process).
_MARKERS: weakref.WeakKeyDictionary[MemoryStore, dict[str, RunMarker]] = weakref.WeakKeyDictionary()


class MemoryPolicyVersion(PolicyVersion):
    def __init__(self, run: RunStore) -> None:
        self._r = run

    def get(self) -> int:
        with self._r.store.cond:
            return self._r.store.versions.get(self._r.run_id, 0)

    def set(self, version: int) -> None:
        with self._r.store.cond:
            self._r.store.versions[self._r.run_id] = version
            self._r.store.cond.notify_all()

    def compare_and_set(self, expected: int, new: int) -> bool:
        with self._r.store.cond:
            if self._r.store.versions.get(self._r.run_id, 0) != expected:
                return False
            self._r.store.versions[self._r.run_id] = new
            self._r.store.cond.notify_all()
            return True

    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        store = self._r.store
        with store.cond:
            store.cond.wait_for(lambda: store.versions.get(self._r.run_id, 0) != seen, timeout_s)
            return store.versions.get(self._r.run_id, 0)


class MemoryEngineRegistry(EngineRegistry):
    def __init__(self, run: RunStore) -> None:
        self._r = run

    def register(self, info: EngineInfo, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        info = msgspec.structs.replace(info, heartbeat_s=time.time())
        with self._r.store.cond:
            self._r.store.engines.setdefault(self._r.run_id, {})[info.engine_id] = (info, time.monotonic() + ttl_s)

    def deregister(self, engine_id: str) -> None:
        with self._r.store.cond:
            self._r.store.engines.get(self._r.run_id, {}).pop(engine_id, None)

    def live(self) -> list[EngineInfo]:
        now = time.monotonic()
        with self._r.store.cond:
            engines = self._r.store.engines.setdefault(self._r.run_id, {})
            for engine_id in [e for e, (_, expiry) in engines.items() if expiry <= now]:
                del engines[engine_id]
            return [info for _, (info, _) in sorted(engines.items())]


class MemoryRunState(RunState):
    def __init__(self, run: RunStore) -> None:
        self._r = run

    def _d(self) -> dict[str, str]:
        return self._r.store.state.setdefault(self._r.run_id, {})

    def get(self, key: str) -> str | None:
        with self._r.store.cond:
            return self._d().get(key)

    def set(self, key: str, value: str) -> None:
        with self._r.store.cond:
            self._d()[key] = value

    def incr(self, key: str, amount: int = 1) -> int:
        with self._r.store.cond:
            d = self._d()
            value = int(d.get(key, "0")) + amount
            d[key] = str(value)
            return value

    def all(self) -> dict[str, str]:
        with self._r.store.cond:
            return dict(self._d())


class MemoryRunMarker:
    """The run's marker: written once by the run's owner (an in-process store cannot lose it, so nothing watches it)."""

    def __init__(self, run: RunStore) -> None:
        self._r = run

    def get(self) -> RunMarker | None:
        with self._r.store.cond:
            return _MARKERS.get(self._r.store, {}).get(self._r.run_id)

    def create(self, marker: RunMarker) -> RunMarker:
        """Write `marker` unless the run has one; return the one the store holds."""
        with self._r.store.cond:
            markers = _MARKERS.setdefault(self._r.store, {})
            return markers.setdefault(self._r.run_id, marker)
