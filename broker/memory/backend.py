"""`MemoryBroker`: the in-process backend assembled from its parts over one run's part of a `MemoryStore`."""

from __future__ import annotations

from broker.base import (
    Broker,
    Consumer,
    Producer,
    RunDataLost,
    RunMarker,
    StreamView,
    check_one_group,
    check_stream,
    marker_lost,
)
from broker.memory.queue import MemoryConsumer, MemoryProducer
from broker.memory.state import MemoryEngineRegistry, MemoryPolicyVersion, MemoryRunMarker, MemoryRunState
from broker.memory.store import MemoryStore, RunStore
from broker.memory.view import MemoryStreamView
from broker.schemas import M
from broker.settings import BrokerConfig


class MemoryBroker(Broker):
    """In-process broker over a `MemoryStore` (a private one unless given)."""

    def __init__(self, config: BrokerConfig | None = None, store: MemoryStore | None = None) -> None:
        self.config = config or BrokerConfig.model_validate({"redis_url": "memory://"})
        self.store = store or MemoryStore()
        self.run_id = self.config.run_id
        self._run = RunStore(self.store, self.run_id, self.config)
        self.policy_version = MemoryPolicyVersion(self._run)
        self.engines = MemoryEngineRegistry(self._run)
        self.state = MemoryRunState(self._run)
        self.marker = MemoryRunMarker(self._run)

    def producer(self, stream: str, kind: type[M]) -> Producer[M]:
        check_stream(stream)
        return MemoryProducer(self._run, stream, kind)

    def consumer(self, stream: str, kind: type[M], group: str, name: str) -> Consumer[M]:
        check_stream(stream)
        with self.store.cond:
            s = self._run.stream(stream)
            if s.group is None:
                s.group = group
            check_one_group(stream, [s.group], group)
        return MemoryConsumer(self._run, stream, kind, group, name)

    def view(self, stream: str) -> StreamView:
        check_stream(stream)
        return MemoryStreamView(self._run, stream)

    def check_durability(self) -> list[str]:
        """Nothing to check: the store lives and dies with this process, by design."""
        return []

    def attach_run(self, who: str, owner: bool = False, resumed_from: str = "") -> RunMarker | None:
        marker = self.marker.get()
        if marker is None and resumed_from:
            raise RunDataLost(marker_lost(self.config.redis_url, self.run_id, None, None, resumed_from))
        if marker is None and owner:
            marker = self.marker.create(RunMarker.new(self.run_id, who))
        return marker

    def close(self) -> None:
        """Nothing to release; the store outlives the broker (other brokers may share it)."""
