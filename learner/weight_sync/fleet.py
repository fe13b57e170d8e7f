"""The engines one push addresses, and the control steps around the weight transfer (coordinator only).

Engines are the live ones of the broker's registry (their ranks as registered) plus the static URLs (their
ranks from `/get_server_info`: every GPU, weights/sglang_release.py `engine_ranks`), sorted by URL so every
rebuild gives the same rank offsets for the same set. Each step runs on all engines concurrently with a timeout
and returns the engines it failed on with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from broker.base import Broker
from common.retry import RetryPolicy
from learner.weight_sync.config import EngineSyncConfig
from learner.weight_sync.group import EngineRef
from weights.engine_client import EngineCallError, EngineClient
from weights.sglang_release import distributed_update_problem, engine_ranks
from weights.version import format_weight_version

logger = logging.getLogger(__name__)


def control_client(cfg: EngineSyncConfig) -> EngineClient:
    """The HTTP client of the engines' control endpoints; idempotent calls retry a refused connection as
    `http_retry` says (its deadline is at least 3 x `http_timeout_s`, so one slow call cannot use it up)."""
    retry = cfg.http_retry
    policy = RetryPolicy(
        retry.max_attempts, retry.base_s, retry.max_backoff_s, max(retry.deadline_s, 3 * cfg.http_timeout_s)
    )
    return EngineClient(cfg.http_timeout_s, policy, cfg.control_token_env)


class Fleet:
    def __init__(self, cfg: EngineSyncConfig, client: EngineClient, broker: Broker | None) -> None:
        if not cfg.engine_urls and (broker is None or not cfg.use_registry):
            raise ValueError(
                "--weight_sync.engine_urls is empty and there is no engine registry to read"
                " (--weight_sync.use_registry with the learner's broker)"
            )
        self.cfg = cfg
        self.client = client
        self.broker = broker
        self._static_ranks: dict[str, int] = {}

    def discover(self) -> tuple[list[EngineRef], dict[str, str]]:
        """The engines to push to, and static engines that could not be asked for their layout."""
        found: dict[str, EngineRef] = {}
        errors: dict[str, str] = {}
        if self.cfg.use_registry and self.broker is not None:
            for info in self.broker.engines.live():
                url = info.url.rstrip("/")
                found[url] = EngineRef(url, info.tp_size)
        for raw in self.cfg.engine_urls:
            url = raw.rstrip("/")
            if url in found:
                continue
            if url not in self._static_ranks:
                try:
                    layout = self.client.server_info(url)
                except EngineCallError as e:
                    errors[url] = f"unreachable: {e}"
                    continue
                if problem := distributed_update_problem(layout):
                    logger.warning("engine %s cannot take distributed weight updates: %s", url, problem)
                self._static_ranks[url] = engine_ranks(layout)
            found[url] = EngineRef(url, self._static_ranks[url])
        return sorted(found.values()), errors

    def forget(self, url: str) -> None:
        """A static engine that failed may come back with another layout: ask again next time."""
        self._static_ranks.pop(url, None)

    def pause(self, engines: Sequence[EngineRef]) -> dict[str, str]:
        mode, timeout_s = self.cfg.pause_mode, self.cfg.pause_timeout_s
        _, errors = self.client.for_all(
            [e.url for e in engines], lambda url: self.client.pause(url, mode, timeout_s), timeout_s + 5
        )
        return errors

    def flush(self, engines: Sequence[EngineRef]) -> dict[str, str]:
        """Flush the KV cache (retried while the engine answers 400); skipped in in_place mode, which keeps it."""
        if self.cfg.pause_mode == "in_place":
            return {}
        deadline, interval = self.cfg.flush_timeout_s, self.cfg.flush_retry_interval_s
        _, errors = self.client.for_all(
            [e.url for e in engines],
            lambda url: self.client.flush_cache(url, deadline, interval),
            deadline + self.cfg.http_timeout_s + 5,
        )
        return errors

    def begin(self, engines: Sequence[EngineRef]) -> dict[str, str]:
        """Open each engine's weight-update session (SGLang 0.5.23 refuses distributed updates outside one)."""
        _, errors = self.client.for_all([e.url for e in engines], self.client.begin_update, self._idempotent_s)
        return errors

    def end(self, engines: Sequence[EngineRef]) -> dict[str, str]:
        _, errors = self.client.for_all([e.url for e in engines], self.client.end_update, self._idempotent_s)
        return errors

    def set_version(self, engines: Sequence[EngineRef], policy_version: int) -> dict[str, str]:
        """Name the new weights on the engines (SGLang's /update_weight_version)."""
        weight_version = format_weight_version(policy_version)
        _, errors = self.client.for_all(
            [e.url for e in engines], lambda url: self.client.set_version(url, weight_version), self._idempotent_s
        )
        return errors

    def resume(self, engines: Sequence[EngineRef]) -> dict[str, str]:
        _, errors = self.client.for_all([e.url for e in engines], self.client.resume, self._idempotent_s)
        return errors

    @property
    def _idempotent_s(self) -> float:
        """How long an idempotent call may take with its retries."""
        return self.cfg.http_timeout_s * self.cfg.http_retry.max_attempts + 5

    def healthy(self, urls: Sequence[str]) -> set[str]:
        """The engines of `urls` that are alive. Asked after a failed bucket, when every engine is paused: the
        probe is liveness (`EngineClient.healthy`, /model_info), never SGLang's generation-based /health, which a
        paused engine fails (it would have labelled every engine that refused an update dead)."""
        results, _ = self.client.for_all(urls, self.client.healthy, self.cfg.http_timeout_s + 5)
        return {url for url, ok in results.items() if ok}
