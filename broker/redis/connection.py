"""The Redis backend's connection: one redis-py client per broker, and the one way every call reaches Redis.

Every call has a socket timeout; a blocking read blocks in chunks shorter than that timeout (`block_chunk_s`),
so a block never reads as a dead connection. Lost connections are retried with jittered exponential backoff
(common.retry.RetryPolicy), bounded by `broker.retry` (`max_attempts`, `deadline_s`); redis-py's own retry is
off so that retries do not nest. Scripts run by SHA and are loaded again when Redis lost them (a restart).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis._parsers.encoders import Encoder
from redis.backoff import NoBackoff
from redis.connection import PythonRespSerializer
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from broker.base import BrokerError
from broker.redis.layout import Keys
from broker.redis.scripts import Script
from broker.settings import BrokerConfig
from common.retry import RetryPolicy

T = TypeVar("T")

_BUFFER_CUTOFF = 6000  # redis-py's default: arguments longer than this are sent as they are, not joined
RETRY_ON: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)


def groups_reply(reply: Any) -> list[Any]:
    """An XINFO GROUPS reply read with raise_on_error=False: XINFO GROUPS on a stream that does not exist yet is
    an error reply, and no groups then."""
    if isinstance(reply, ResponseError):
        if "no such key" not in str(reply).lower():
            raise reply
        return []
    return list(reply)


def payload_packer() -> PythonRespSerializer:
    """redis-py's pure-Python command packer, also where hiredis is installed: it sends a large argument (a
    payload, a bytearray from the producer's reused buffers) as it is, where hiredis's packer copies every
    argument into one new bytes object: 0.5 MB of fresh memory per message, page faults included."""
    encoder: Any = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]
    return PythonRespSerializer(_BUFFER_CUTOFF, encoder.encode)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Connection:
    """A client of one Redis (redis://, rediss:// with user:password, unix://), the run's key names, and the
    timing every reader derives from the config. The password may instead come from `redis_password_file` or
    `redis_password_env`. Connecting pings, so a wrong URL or password fails here."""

    def __init__(self, config: BrokerConfig) -> None:
        if not config.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"--broker.redis_url: {redact_url(config.redis_url)!r} must start with redis://, rediss://, "
                "unix:// or memory://"
            )
        self.config = config
        self.keys = Keys(config.run_id)
        self.url = redact_url(config.redis_url)
        # From a file or the environment, so that it is in neither argv nor the URL (which errors and logs
        # print redacted anyway).
        password = config.redis_password()
        self.client = redis.Redis.from_url(
            config.redis_url,
            **({"password": password} if password is not None else {}),
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),  # retries are ours (below), bounded by a deadline
            driver_info=None,  # no CLIENT SETINFO: Redis 6.2 does not know it
            command_packer=payload_packer(),
        )
        self._retry: RetryPolicy = config.retry.policy()
        # How often a reader looks for idle entries of dead consumers, and the longest single block of a
        # blocking read (under the socket timeout, so a block never reads as a dead connection).
        self.claim_interval_s = min(config.claim_idle_s, 1.0)
        self.block_chunk_s = min(self.claim_interval_s, config.socket_timeout_s / 2)
        self.call(self.client.ping, "PING")

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one round trip, retrying on a lost connection or timeout; wrong credentials fail at once."""

        def attempt() -> T:
            try:
                return fn()
            except redis.AuthenticationError as e:  # a ConnectionError subclass, but retrying cannot help
                raise BrokerError(f"Redis at {self.url} refused the credentials: {e}") from e
            except ResponseError as e:  # an error reply (OOM, wrong type, ...): retrying cannot help either
                raise BrokerError(f"{what} on {self.url}: {e}") from e

        try:
            return self._retry.call(attempt, RETRY_ON, f"{what} on {self.url}")
        except RETRY_ON as e:
            raise BrokerError(f"{what} on {self.url} failed after retries: {e!r}") from e

    def length_and_groups(self, key: str) -> tuple[int, list[Any]]:
        """XLEN and XINFO GROUPS (parsed) of the stream `key` in one round trip; no groups before it exists."""

        def run() -> tuple[int, list[Any]]:
            pipe = self.client.pipeline(transaction=False)
            pipe.xlen(key)
            pipe.xinfo_groups(key)
            xlen, groups = pipe.execute(raise_on_error=False)
            if isinstance(xlen, ResponseError):
                raise xlen
            return int(xlen), groups_reply(groups)

        return self.call(run, "XLEN+XINFO GROUPS")

    def eval_many(self, script: Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Run `script` once per (keys, args) in one pipelined round trip; load it if Redis lost it (restart)."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(3):

            def run(todo: list[int] = todo) -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                return pipe.execute(raise_on_error=False)

            missing = []
            for i, r in zip(todo, self.call(run, f"script {script.name}"), strict=True):
                if isinstance(r, NoScriptError):
                    missing.append(i)
                elif isinstance(r, ResponseError):
                    raise BrokerError(f"script {script.name} failed on {self.url}: {r}")
                else:
                    results[i] = r
            if not missing:
                return results
            self.call(lambda: self.client.script_load(script.source), f"SCRIPT LOAD {script.name}")
            todo = missing
        raise BrokerError(f"script {script.name} kept disappearing from {self.url} (SCRIPT FLUSH in a loop?)")

    def close(self) -> None:
        self.client.close()
