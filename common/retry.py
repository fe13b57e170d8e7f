"""One retry policy for every network call: bounded attempts, exponential backoff with full jitter, a deadline.

Only the exception types given are retried; anything else propagates at once (no speculative catching).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from common.config import BaseConfig

T = TypeVar("T")
log = logging.getLogger(__name__)


class RetryConfig(BaseConfig):
    """How a call is retried: the one shape every config section that retries uses (`[...retry]` tables)."""

    max_attempts: int = Field(5, ge=1)
    """Tries in all, the first included (1: never retried)."""
    base_s: float = Field(0.1, ge=0)
    """Backoff before the first retry (the cap of its full-jitter draw); doubles per retry."""
    max_backoff_s: float = Field(5.0, ge=0)
    """Largest backoff between two tries."""
    deadline_s: float = Field(60.0, gt=0)
    """No retry starts after this long since the first try."""

    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.base_s, self.max_backoff_s, self.deadline_s)


def move_retry_keys(data: Any, section: str, moves: Mapping[str, tuple[str, int]], table: str = "retry") -> Any:
    """A config's raw table with its deprecated flat retry keys moved into its `retry` table (the RetryConfig
    shape; `table` names it), each with a warning naming the new key, so files and flags written before keep
    loading. `section` names the config's own table in the warning (`judge`; empty at the top level).

    `moves`: old key -> (RetryConfig field, amount added to the value); 1 turns a count of retries into attempts,
    which count the first try. Setting an old key and its new one both is an error: which one wins is unclear."""
    if not isinstance(data, dict) or not any(old in data for old in moves):
        return data
    retry = data.get(table, {})
    if isinstance(retry, BaseModel):
        retry = retry.model_dump(exclude_unset=True)
    if not isinstance(retry, dict):
        return data  # not a table: validation names `retry`
    data, retry = dict(data), dict(retry)
    at = f"{section}." if section else ""
    for old, (new, add) in moves.items():
        if old not in data:
            continue
        value = data.pop(old)
        if new in retry:
            raise ValueError(f"--{at}{old} is deprecated and --{at}{table}.{new} is set too: keep the latter")
        retry[new] = value + add if add and isinstance(value, int) and not isinstance(value, bool) else value
        hint = f" (= {old} + {add}: attempts count the first try)" if add else ""
        log.warning("--%s%s is deprecated: use --%s%s.%s%s", at, old, at, table, new, hint)
    data[table] = retry
    return data


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_s: float = 0.1
    max_backoff_s: float = 5.0
    deadline_s: float = 60.0

    def backoff_s(self, attempt: int) -> float:
        """Full-jitter backoff before retry number `attempt` (1-based)."""
        return random.uniform(0, min(self.max_backoff_s, self.base_s * 2 ** (attempt - 1)))

    def _give_up(self, attempt: int, start: float, wait_s: float) -> bool:
        return attempt >= self.max_attempts or time.monotonic() - start + wait_s > self.deadline_s

    def call(self, fn: Callable[[], T], retry_on: tuple[type[BaseException], ...], what: str = "call") -> T:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except retry_on as e:
                wait_s = self.backoff_s(attempt)
                if self._give_up(attempt, start, wait_s):
                    raise
                log.warning(
                    "%s failed (attempt %d/%d): %r; retrying in %.2fs", what, attempt, self.max_attempts, e, wait_s
                )
                time.sleep(wait_s)

    async def acall(
        self, fn: Callable[[], Awaitable[T]], retry_on: tuple[type[BaseException], ...], what: str = "call"
    ) -> T:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except retry_on as e:
                wait_s = self.backoff_s(attempt)
                if self._give_up(attempt, start, wait_s):
                    raise
                log.warning(
                    "%s failed (attempt %d/%d): %r; retrying in %.2fs", what, attempt, self.max_attempts, e, wait_s
                )
                await asyncio.sleep(wait_s)
