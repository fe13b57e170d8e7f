"""GET /metrics of the built-in engine: SGLang's metric names where SGLang has one, `longtrace_engine_*` beside.

One Grafana dashboard (deploy/grafana/longtrace.json) serves this engine and a real SGLang engine started with
`--enable-metrics`, so the names, types and the `model_name` label are SGLang's (python/sglang/srt/metrics/
collector.py): `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:num_used_tokens`, `sglang:token_usage`,
`sglang:max_total_num_tokens`, `sglang:gen_throughput` (gauges, read from the scheduler at scrape time);
`sglang:prompt_tokens_total`, `sglang:generation_tokens_total`, `sglang:cached_tokens_total` (prompt tokens copied
from another request's slot, not computed: prefix sharing; label `cache_source="device"` as SGLang 0.5's),
`sglang:num_requests_total`, `sglang:num_aborted_requests_total` (counters) and `sglang:e2e_request_latency_seconds`
(histogram, SGLang's buckets), counted per finished request. Left out because this engine has nothing they would
measure: `sglang:cache_hit_rate` (no cache outlives its requests), time to first token and inter-token latency (the
scheduler keeps no per-token times), speculative decoding, disaggregation, grammar.

What SGLang lacks: `longtrace_engine_weight_version` (the policy version of the weights served,
weights/version.py), `longtrace_engine_paused`, `longtrace_engine_prefill_tokens_total` (tokens
the prefill forwards computed, read from the scheduler: a group of n samples of one prompt adds about one prompt
with prefix sharing, n without), and `longtrace_engine_weight_updates_total{op, outcome}` with
`longtrace_engine_weight_update_seconds{op}` for the weight-update endpoints.

A finished request is seen through its sink: `install` wraps the scheduler's `submit` so each request's sink
records it on the scheduler thread before handing the snapshot on; nothing else of the request changes.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from weights.version import INITIAL_POLICY_VERSION, parse_weight_version

if TYPE_CHECKING:
    from rollout_server.engine.engine import Engine
    from rollout_server.engine.request_state import Req, Snapshot

# SGLang's default buckets of `sglang:e2e_request_latency_seconds` (TokenizerMetricsCollector).
E2E_BUCKETS_S = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400)
WEIGHT_UPDATE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WEIGHT_UPDATE_PATHS = {
    "/update_weights_from_distributed": "distributed",
    "/update_weights_from_disk": "disk",
    "/update_weight_version": "version",
}
_INSTALLED: weakref.WeakKeyDictionary[Engine, EngineMetrics] = weakref.WeakKeyDictionary()
GEN_THROUGHPUT_WINDOW_S = 10.0
"""`sglang:gen_throughput` is the generation rate over about this long (SGLang: its last log interval)."""


class _SchedulerCollector(Collector):
    """The gauges, read from the scheduler at each scrape (counts of lists and a lock-guarded queue length)."""

    def __init__(self, engine: Engine, labels: dict[str, str]) -> None:
        self._engine = engine
        self._labels = labels
        self._history: list[tuple[float, int]] = []  # (time, scheduler.num_generated) of recent scrapes
        self._lock = threading.Lock()

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _gen_throughput(self, generated: int) -> float:
        now = time.monotonic()
        with self._lock:
            self._history.append((now, generated))
            self._history = [h for h in self._history if h[0] >= now - GEN_THROUGHPUT_WINDOW_S]
            t0, n0 = self._history[0]
        return (generated - n0) / (now - t0) if now > t0 else 0.0

    def collect(self) -> Iterator[Metric]:
        s = self._engine.scheduler
        running = list(s.running)  # one atomic copy: the scheduler thread rebinds or sorts the list
        used = sum(r.kv_len for r in running)
        total = s.runner.cache.num_slots * s.runner.cache.max_len
        yield self._gauge("sglang:num_running_reqs", "The number of running requests.", len(running))
        yield self._gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", s.num_queued)
        yield self._gauge("sglang:num_used_tokens", "The number of used tokens.", used)
        yield self._gauge("sglang:token_usage", "The token usage.", used / total if total else 0.0)
        yield self._gauge("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.", total)
        yield self._gauge(
            "sglang:gen_throughput", "The generation throughput (token/s).", self._gen_throughput(s.num_generated)
        )
        try:
            version = float(parse_weight_version(s.weight_version, INITIAL_POLICY_VERSION))
        except ValueError:  # a version string that names no policy version (set by hand): not a number
            version = math.nan
        yield self._gauge("longtrace_engine_weight_version", "Policy version of the weights served", version)
        yield self._gauge("longtrace_engine_paused", "1 while generation is paused", 1.0 if s.paused else 0.0)
        c = CounterMetricFamily(
            "longtrace_engine_prefill_tokens", "Prompt tokens computed by prefill forwards", labels=list(self._labels)
        )
        c.add_metric(list(self._labels.values()), s.num_prefill_tokens)
        yield c


class EngineMetrics:
    """The engine's registry: request counters fed by each finished request, the scheduler's gauges at scrape."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.labels = {"model_name": engine.served_model_name}
        names = list(self.labels)
        self.prompt_tokens = Counter(
            "sglang:prompt_tokens", "Number of prefill tokens processed.", names, registry=r
        ).labels(**self.labels)
        self.generation_tokens = Counter(
            "sglang:generation_tokens", "Number of generation tokens processed.", names, registry=r
        ).labels(**self.labels)
        self.cached_tokens = Counter(
            "sglang:cached_tokens", "Number of cached prompt tokens by source (device/host/storage).",
            [*names, "cache_source"], registry=r,
        ).labels(**self.labels, cache_source="device")  # fmt: skip
        self.requests = Counter("sglang:num_requests", "Number of requests processed.", names, registry=r).labels(
            **self.labels
        )
        self.aborted = Counter("sglang:num_aborted_requests", "Number of requests aborted.", names, registry=r).labels(
            **self.labels
        )
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            names,
            buckets=E2E_BUCKETS_S,
            registry=r,
        ).labels(**self.labels)
        self.weight_updates = Counter(
            "longtrace_engine_weight_updates", "Weight-update calls by op and outcome (ok, failed)", ["op", "outcome"],
            registry=r,
        )  # fmt: skip
        self.weight_update_seconds = Histogram(
            "longtrace_engine_weight_update_seconds", "Time of a weight-update call by op", ["op"],
            buckets=WEIGHT_UPDATE_BUCKETS_S, registry=r,
        )  # fmt: skip
        r.register(_SchedulerCollector(engine, self.labels))

    def finished(self, req: Req, snap: Snapshot) -> None:
        """One request finished (on the scheduler thread): SGLang's `observe_one_finished_request`."""
        if snap.finish is not None and snap.finish.get("type") == "abort":
            self.aborted.inc()
        self.prompt_tokens.inc(len(req.input_ids))
        self.cached_tokens.inc(snap.cached_tokens)
        self.generation_tokens.inc(len(snap.output_ids))
        self.requests.inc()
        self.e2e.observe(time.monotonic() - req.created_s)

    def watch(self, submit: Callable[..., bool]) -> Callable[..., bool]:
        """`Scheduler.submit` with each request's sink wrapped: a final snapshot is counted, then handed on."""

        def counted_submit(reqs: Sequence[Req], *args: object, **kwargs: object) -> bool:
            for req in reqs:
                req.sink = self._counting_sink(req, req.sink)
            return submit(reqs, *args, **kwargs)

        return counted_submit

    def _counting_sink(self, req: Req, sink: Callable[[Snapshot], None]) -> Callable[[Snapshot], None]:
        def counting(snap: Snapshot) -> None:
            if snap.finish is not None:
                self.finished(req, snap)
            sink(snap)

        return counting

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _WeightUpdateTimer:
    """ASGI middleware: each weight-update call counted by op and outcome (a 2xx status is ok) and timed."""

    def __init__(self, app: ASGIApp, metrics: EngineMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        op = WEIGHT_UPDATE_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if op is None:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.monotonic()

        async def seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, seen)
        finally:
            self.metrics.weight_updates.labels(op, "ok" if 200 <= status < 300 else "failed").inc()
            self.metrics.weight_update_seconds.labels(op).observe(time.monotonic() - start)


def install(app: FastAPI, engine: Engine) -> EngineMetrics:
    """GET /metrics on `app` (open, as /health: no token), the request counters on `engine`'s scheduler, and the
    weight-update timer. Call before the guard is added, so the guard stays the outermost middleware."""
    metrics = _INSTALLED.get(engine)
    if metrics is None:  # one registry per engine: a second app over the same engine must not count twice
        metrics = _INSTALLED[engine] = EngineMetrics(engine)
        engine.scheduler.submit = metrics.watch(engine.scheduler.submit)  # type: ignore[method-assign]
    app.state.metrics = metrics
    app.add_api_route("/metrics", metrics.render, methods=["GET"], include_in_schema=False)
    app.add_middleware(_WeightUpdateTimer, metrics=metrics)
    return metrics
