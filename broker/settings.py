"""The broker's typed config: which Redis, which run, and the queue's delivery and backpressure knobs.

Every service config embeds it as its `broker` section (`--broker.redis_url ...`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from common.config import BaseConfig, ConfigError
from common.retry import RetryConfig, move_retry_keys

log = logging.getLogger(__name__)

PASSWORD_ENV = "LONGTRACE_REDIS_PASSWORD"


class BrokerRetryConfig(RetryConfig):
    """RetryConfig of a Redis call on connection loss (`[broker.retry]`)."""

    max_attempts: int = Field(8, ge=1)
    """Tries in all, the first included (1: never retried)."""
    deadline_s: float = Field(60.0, gt=0)
    """No retry starts after this long since the first try (a Redis restart must end within it)."""


class BrokerConfig(BaseConfig):
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL: redis:// or rediss:// (TLS), with user:password for ACLs; memory:// for the in-process backend.
    A password here is visible in argv; prefer `redis_password_file` or `redis_password_env`."""
    redis_password_file: str = ""
    """File holding the Redis password (e.g. a mounted secret), so it is not in argv or the URL. Never logged."""
    redis_password_env: str = PASSWORD_ENV
    """Environment variable holding the Redis password, used when it is set and non-empty. Never logged."""
    run_id: str = "default"
    """Namespace of every stream and key of this run."""
    socket_timeout_s: float = Field(10.0, gt=0)
    """Timeout of every Redis call (blocking reads add their block time)."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Timeout of opening a connection."""
    retry: BrokerRetryConfig = Field(default_factory=BrokerRetryConfig)
    """Retries of a Redis call on connection loss, with jittered exponential backoff (8 attempts within 60 s).
    Was `retry_attempts` / `retry_deadline_s`, still read (with a warning)."""
    max_backlog: int = Field(256, ge=1)
    """A producer waits while a stream holds this many entries not yet delivered to its consumer group (bounds
    Redis memory). Entries a consumer holds (delivered, not acked) do not count: the learner holds its until a
    checkpoint, and counting them would deadlock producers behind entries that only more input can release."""
    max_entry_mb: float = Field(64.0, gt=0)
    """Largest encoded message a producer may publish; a larger one is refused with an error naming this flag."""
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
    dead_max_entries: int = Field(10_000, ge=1)
    """The dead stream keeps about this many letters, the newest: each dead letter trims the oldest beyond it
    (approximately in Redis, `XTRIM MAXLEN ~`, whole stream nodes of ~100 entries). The learner reads every letter of
    its run to release the group's admission slot, and saves how far it read with each checkpoint; a letter trimmed
    before it was read (more letters than this while the learner was down or behind) is not silently lost: the
    learner's scan for vanished groups (`--batch.lost_scan_after_s`) releases that group as `lost`
    (`groups_dead_lettered/lost` in metrics.jsonl, logged). Size it for the letters a run writes while its learner
    is down; inspect or replay letters before they are trimmed."""

    @model_validator(mode="before")
    @classmethod
    def _moved_retry_keys(cls, data: Any) -> Any:
        return move_retry_keys(
            data, "broker", {"retry_attempts": ("max_attempts", 0), "retry_deadline_s": ("deadline_s", 0)}
        )

    def redis_password(self) -> str | None:
        """The password from `redis_password_file`, else from `redis_password_env` when set, else None (the URL's
        own, if any, applies). ConfigError for a missing or empty file, or a password given in two places."""
        password: str | None = None
        source = ""
        if self.redis_password_file:
            path = Path(self.redis_password_file)
            if not path.is_file():
                raise ConfigError(f"--broker.redis_password_file: no such file {self.redis_password_file!r}")
            password = path.read_text().strip()
            if not password:
                raise ConfigError(f"--broker.redis_password_file: {self.redis_password_file!r} is empty")
            source = "--broker.redis_password_file"
        elif self.redis_password_env and os.environ.get(self.redis_password_env):
            password = os.environ[self.redis_password_env]
            source = f"environment variable {self.redis_password_env} (--broker.redis_password_env)"
        if password is not None and not self.redis_url.startswith("memory://"):
            if urlsplit(self.redis_url).password is not None:
                raise ConfigError(f"--broker.redis_url has a password and {source} sets one too: set it in one place")
        return password
