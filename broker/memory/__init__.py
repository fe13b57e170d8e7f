"""The in-process backend of the broker: the same contract as `broker.redis.RedisBroker`, for learner and
rollout unit tests.

Messages are stored encoded, so a test sees the same (de)serialisation, SchemaError dead letters, redelivery
counts, claims of idle entries, backpressure (on undelivered entries) and dedup as against Redis. One condition
variable per store guards everything; blocking calls wait on it with a timeout.

One module per part: `store` (the data, `memory://NAME` sharing), `queue` (producer and consumer), `state`
(policy version, engine registry, run state), `view` (the read-only view) and `backend` (`MemoryBroker`).
"""

from broker.memory.backend import MemoryBroker
from broker.memory.store import MemoryStore, store_for_url

__all__ = ["MemoryBroker", "MemoryStore", "store_for_url"]
