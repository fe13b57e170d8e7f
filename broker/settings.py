"""The broker's typed config: which Redis, which run, and the queue's delivery and backpressure knobs.

Every service config embeds it as its `broker` section (`--broker.redis_url ...`).
"""

from __future__ import annotations

from pydantic import Field

from broker.config import BaseConfig


class BrokerConfig(BaseConfig):
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL: redis:// or rediss:// (TLS), with user:password for ACLs; memory:// for the in-process backend."""
    run_id: str = "default"
    """Namespace of every stream and key of this run."""
    socket_timeout_s: float = Field(10.0, gt=0)
    """Timeout of every Redis call (blocking reads add their block time)."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Timeout of opening a connection."""
    retry_attempts: int = Field(8, ge=1)
    """Attempts of a Redis call on connection loss, with jittered exponential backoff."""
    retry_deadline_s: float = Field(60.0, gt=0)
    """Give up retrying a Redis call after this long."""
    max_backlog: int = Field(256, ge=1)
    """A producer waits while a stream holds this many unacked entries (bounds Redis memory)."""
    backpressure_timeout_s: float = Field(600.0, gt=0)
    """How long a producer waits for a full stream to drain before raising BackpressureTimeout."""
    block_s: float = Field(1.0, ge=0)
    """Default block time of a consumer read."""
    claim_idle_s: float = Field(60.0, gt=0)
    """An entry pending this long in another consumer is presumed orphaned and reclaimed."""
    max_deliveries: int = Field(5, ge=1)
    """An entry delivered more often than this goes to the dead stream."""
    dedup_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    """How long a published dedup key (group id) is remembered."""
