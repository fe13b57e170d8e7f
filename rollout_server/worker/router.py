"""Pick an engine for each request.

`BuiltinRouter` spreads requests over the live engines (static URLs plus the broker's engine registry,
re-read every `registry_refresh_s`) by least outstanding requests, with at most `max_inflight_per_engine`
per engine. A circuit breaker takes an engine out of rotation after `failure_threshold` consecutive failures
(requests or health probes); after `cooldown_s` the periodic health probe lets it back in. The caller
retries a failed request on another engine (`exclude`).

Group affinity (`GroupAffinity`, one per group): the group's first lease picks its engine by the same policy, and
its other requests go there too, so the engine prefills the group's shared prompt once (prefix sharing). A request
leaves the group's engine only when that engine is excluded for it (a retry after a failure), full
(`max_inflight_per_engine`: it spills to the least loaded other one), or out of rotation (the group moves: the next
lease picks a new engine for all of it).

`SglangRouterProxy` sends everything to one sglang-router, which does its own balancing and health checks.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from broker.base import Broker
from rollout_server.worker.client import EngineClient, EngineError, EngineHttp, make_engine_http
from rollout_server.worker.config import BuiltinRouterConfig, RolloutConfig, SglangRouterConfig

log = logging.getLogger(__name__)


class NoEngineAvailable(EngineError):
    """No engine was in rotation with a free slot within `engine_wait_timeout_s`."""


@dataclass
class Engine:
    """An engine as the router sees it."""

    engine_id: str
    url: str
    client: EngineClient
    static: bool = False  # from --engines.urls: never dropped by a registry refresh
    outstanding: int = 0
    consecutive_failures: int = 0
    open_until: float | None = None  # circuit open (out of rotation) while set; probed again after this time
    removed: bool = False  # left the registry; kept only until its outstanding requests end
    num_requests: int = 0
    num_failures: int = 0


@dataclass
class GroupAffinity:
    """The engine a group's requests prefer; set by the group's first lease (`Router.lease(affinity=...)`)."""

    engine_id: str | None = None


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of one engine for metrics."""

    engine_id: str
    outstanding: int
    in_rotation: bool
    num_requests: int
    num_failures: int


class Router(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def lease(
        self, exclude: Collection[str] = (), affinity: GroupAffinity | None = None
    ) -> AbstractAsyncContextManager[Engine]:
        """`async with router.lease(exclude) as engine:` holds one request slot on the chosen engine.

        Engines named in `exclude` are avoided while another is in rotation (retry elsewhere). With `affinity`
        the group's engine is preferred (set by the first lease, see the module docstring).
        """

    @abc.abstractmethod
    def report_success(self, engine: Engine) -> None: ...

    @abc.abstractmethod
    def report_failure(self, engine: Engine, reason: str) -> None: ...

    @abc.abstractmethod
    def snapshot(self) -> list[EngineLoad]: ...

    @abc.abstractmethod
    def raise_if_stopped(self) -> None:
        """Re-raise the error of a background loop that died (the worker's main loop calls this)."""


class BuiltinRouter(Router):
    def __init__(
        self,
        cfg: RolloutConfig,
        broker: Broker | None,
        http: EngineHttp | None = None,
    ) -> None:
        assert isinstance(cfg.router, BuiltinRouterConfig)
        self._cfg = cfg
        self._rcfg: BuiltinRouterConfig = cfg.router
        self._broker = broker if cfg.engines.use_registry else None
        self._own_http = http is None
        self._http = http or make_engine_http()
        self._engines: dict[str, Engine] = {}  # by url
        self._changed = asyncio.Condition()
        self._tie_break = itertools.count()
        self._background: list[asyncio.Task[None]] = []
        for url in cfg.engines.urls:
            self._add(url.rstrip("/"), url.rstrip("/"), static=True)

    # -- membership -------------------------------------------------------------------------------------
    def _add(self, engine_id: str, url: str, static: bool) -> Engine:
        c = self._cfg
        client = EngineClient(
            url, self._http, c.request_timeout_s, c.connect_timeout_s, c.health_timeout_s, c.initial_policy_version
        )
        engine = self._engines[url] = Engine(engine_id=engine_id, url=url, client=client, static=static)
        log.info("engine %s (%s) joined the rotation", engine_id, url)
        return engine

    async def refresh(self) -> None:
        """Sync the engine set with the registry: add new live engines, drop those whose heartbeat expired."""
        if self._broker is None:
            return
        live = await asyncio.to_thread(self._broker.engines.live)
        live_urls = {}
        for info in live:
            url = info.url.rstrip("/")
            live_urls[url] = info.engine_id
        async with self._changed:
            for url, engine_id in live_urls.items():
                engine = self._engines.get(url)
                if engine is None:
                    self._add(engine_id, url, static=False)
                elif engine.removed:
                    engine.removed = False
                    log.info("engine %s (%s) is back in the registry", engine_id, url)
            for url, engine in list(self._engines.items()):
                if engine.static or url in live_urls or engine.removed:
                    continue
                engine.removed = True
                log.warning("engine %s (%s) left the registry (heartbeat expired)", engine.engine_id, url)
            self._drop_removed()
            self._changed.notify_all()

    def _drop_removed(self) -> None:
        for url, engine in list(self._engines.items()):
            if engine.removed and engine.outstanding == 0:
                del self._engines[url]

    # -- selection --------------------------------------------------------------------------------------
    def _in_rotation(self, engine: Engine) -> bool:
        return not engine.removed and engine.open_until is None

    def _pick(self, exclude: Collection[str], affinity: GroupAffinity | None = None) -> Engine | None:
        healthy = [e for e in self._engines.values() if self._in_rotation(e)]
        cap = self._rcfg.max_inflight_per_engine
        home = None
        if affinity is not None and affinity.engine_id is not None:
            home = next((e for e in healthy if e.engine_id == affinity.engine_id), None)
            if home is not None and home.engine_id not in exclude and home.outstanding < cap:
                return home
        preferred = [e for e in healthy if e.engine_id not in exclude] or healthy  # retry elsewhere when possible
        free = [e for e in preferred if e.outstanding < cap]
        if not free:
            return None
        least = min(e.outstanding for e in free)
        ties = [e for e in free if e.outstanding == least]
        engine = ties[next(self._tie_break) % len(ties)]
        if affinity is not None and home is None:  # the group's first request, or its engine left the rotation
            affinity.engine_id = engine.engine_id
        return engine

    @asynccontextmanager
    async def lease(
        self, exclude: Collection[str] = (), affinity: GroupAffinity | None = None
    ) -> AsyncIterator[Engine]:
        deadline = time.monotonic() + self._rcfg.engine_wait_timeout_s
        async with self._changed:
            while (engine := self._pick(exclude, affinity)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoEngineAvailable(
                        f"no engine in rotation with a free slot after {self._rcfg.engine_wait_timeout_s}s "
                        f"({len(self._engines)} known)"
                    )
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=remaining)
                except TimeoutError:
                    continue
            engine.outstanding += 1
            engine.num_requests += 1
        try:
            yield engine
        finally:
            async with self._changed:
                engine.outstanding -= 1
                self._drop_removed()
                self._changed.notify_all()

    # -- circuit breaker --------------------------------------------------------------------------------
    def report_success(self, engine: Engine) -> None:
        engine.consecutive_failures = 0

    def report_failure(self, engine: Engine, reason: str) -> None:
        engine.consecutive_failures += 1
        engine.num_failures += 1
        if engine.open_until is None and engine.consecutive_failures >= self._rcfg.failure_threshold:
            engine.open_until = time.monotonic() + self._rcfg.cooldown_s
            log.warning(
                "engine %s out of rotation after %d consecutive failures: %s",
                engine.engine_id,
                engine.consecutive_failures,
                reason,
            )

    async def probe(self) -> None:
        """Health-check every engine once: failures count toward the breaker; a pass after cooldown closes it.
        The check is liveness (`EngineClient.healthy`), which an engine paused for a weight push passes: SGLang's
        generation-based /health would fail every engine of the fleet at each push and open all their breakers."""
        engines = list(self._engines.values())
        results = await asyncio.gather(*(e.client.healthy() for e in engines))
        now = time.monotonic()
        async with self._changed:
            for engine, ok in zip(engines, results, strict=True):
                if not ok:
                    self.report_failure(engine, "health check failed")
                    continue
                engine.consecutive_failures = 0
                if engine.open_until is not None and now >= engine.open_until:
                    engine.open_until = None
                    log.info("engine %s back in rotation (health check passed)", engine.engine_id)
            self._changed.notify_all()

    # -- background loops -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        await self.probe()
        self._background = [
            asyncio.create_task(self._every(self._cfg.engines.registry_refresh_s, self.refresh), name="refresh"),
            asyncio.create_task(self._every(self._rcfg.health_interval_s, self.probe), name="health"),
        ]

    async def _every(self, interval_s: float, fn: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await fn()

    def raise_if_stopped(self) -> None:
        """Re-raise the error of a background loop that died (the worker's main loop calls this)."""
        for task in self._background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"router loop {task.get_name()!r} died") from task.exception()

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._own_http:
            await self._http.aclose()

    def snapshot(self) -> list[EngineLoad]:
        return [
            EngineLoad(e.engine_id, e.outstanding, self._in_rotation(e), e.num_requests, e.num_failures)
            for e in self._engines.values()
        ]


class SglangRouterProxy(Router):
    """Every request goes to one sglang-router; it balances and health-checks the engines itself."""

    def __init__(self, cfg: RolloutConfig, http: EngineHttp | None = None) -> None:
        assert isinstance(cfg.router, SglangRouterConfig)
        self._own_http = http is None
        self._http = http or make_engine_http()
        url = cfg.router.url.rstrip("/")
        client = EngineClient(
            url, self._http, cfg.request_timeout_s, cfg.connect_timeout_s, cfg.health_timeout_s,
            cfg.initial_policy_version,
        )  # fmt: skip
        self._engine = Engine(engine_id=f"sglang-router@{url}", url=url, client=client, static=True)
        self._slots = asyncio.Semaphore(cfg.router.max_inflight)

    async def start(self) -> None:
        if not await self._engine.client.healthy():
            log.warning("sglang-router %s does not answer /health yet", self._engine.url)

    async def close(self) -> None:
        if self._own_http:
            await self._http.aclose()

    @asynccontextmanager
    async def lease(
        self, exclude: Collection[str] = (), affinity: GroupAffinity | None = None
    ) -> AsyncIterator[Engine]:
        # No affinity here: sglang-router places requests itself (its cache-aware policy keeps a prefix together).
        async with self._slots:
            self._engine.outstanding += 1
            self._engine.num_requests += 1
            try:
                yield self._engine
            finally:
                self._engine.outstanding -= 1

    def report_success(self, engine: Engine) -> None:
        engine.consecutive_failures = 0

    def report_failure(self, engine: Engine, reason: str) -> None:
        engine.consecutive_failures += 1
        engine.num_failures += 1

    def raise_if_stopped(self) -> None:
        return None

    def snapshot(self) -> list[EngineLoad]:
        e = self._engine
        return [EngineLoad(e.engine_id, e.outstanding, True, e.num_requests, e.num_failures)]


def build_router(cfg: RolloutConfig, broker: Broker | None, http: EngineHttp | None = None) -> Router:
    if isinstance(cfg.router, SglangRouterConfig):
        return SglangRouterProxy(cfg, http)
    return BuiltinRouter(cfg, broker, http)
