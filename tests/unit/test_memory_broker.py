"""The broker contract on the in-process MemoryBroker, plus what only it has (memory:// store sharing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker.base import TASKS, Broker
from broker.factory import connect
from broker.memory import MemoryBroker, MemoryStore
from broker.schemas import Task
from broker.settings import BrokerConfig
from tests.helpers.broker_contract import *  # noqa: F403
from tests.helpers.broker_contract import make_task


@pytest.fixture
def make_broker() -> Callable[..., Broker]:
    """MemoryBrokers of one run over one store (like processes sharing one Redis)."""
    store = MemoryStore()

    def make(**overrides: Any) -> Broker:
        config = BrokerConfig.model_validate({"redis_url": "memory://", "run_id": "test", **overrides})
        return MemoryBroker(config, store)

    return make


def test_memory_urls_share_a_store_by_name() -> None:
    """Guards against connect(memory://NAME) giving each service its own queues (they could never talk)."""
    a = connect(BrokerConfig.model_validate({"redis_url": "memory://shared-by-name", "run_id": "r1"}))
    b = connect(BrokerConfig.model_validate({"redis_url": "memory://shared-by-name", "run_id": "r1"}))
    a.producer(TASKS, Task).publish([make_task(1)])
    assert b.producer(TASKS, Task).backlog() == 1
    private = connect(BrokerConfig.model_validate({"redis_url": "memory://", "run_id": "r1"}))
    assert private.producer(TASKS, Task).backlog() == 0
    assert isinstance(a, MemoryBroker)
