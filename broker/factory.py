"""Pick the broker backend from the config's URL: memory:// is in-process, anything else is Redis."""

from __future__ import annotations

from broker.base import Broker
from broker.settings import BrokerConfig


def connect(config: BrokerConfig) -> Broker:
    """A connected broker for `config.run_id`: MemoryBroker for memory://NAME, else RedisBroker."""
    if config.redis_url.startswith("memory://"):
        from broker.memory import MemoryBroker, store_for_url

        return MemoryBroker(config, store_for_url(config.redis_url))
    from broker.redis import RedisBroker

    return RedisBroker(config)
