"""Worker metrics on a Prometheus `/metrics` endpoint (on by default): throughput, in-flight work, retries,
per-engine load, all named `longtrace_rollout_*` (the dashboard: deploy/grafana/longtrace.json).

Counters give totals (Prometheus derives rates); `*_per_s` gauges give the rate over the last `window_s`
for a quick look without a Prometheus server. Each worker has its own registry, so several workers (or
tests) in one process do not collide; several worker processes on one host do not collide on the port either:
`serve` takes the first free port of `port .. port + span - 1` (then any free one) and logs which.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics_http import MetricsHTTP
from rollout_server.worker.router import EngineLoad

log = logging.getLogger(__name__)


class _Rate:
    """Events per second over a sliding window, fed by a counter's increments."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._events: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()  # read by the metrics server's thread

    def add(self, n: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, n))
            self._prune(now)

    def per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            return sum(n for _, n in self._events) / self._window_s

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self._window_s:
            self._events.popleft()


class _RatedCounter:
    """A Counter whose increments also feed a sliding-window rate gauge."""

    def __init__(self, counter: Counter, rate: _Rate) -> None:
        self._counter = counter
        self._rate = rate

    def inc(self, n: float = 1.0) -> None:
        self._counter.inc(n)
        self._rate.add(n)


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], list[EngineLoad]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        loads = self._snapshot()
        outstanding = GaugeMetricFamily(
            "longtrace_rollout_engine_outstanding", "Requests in flight per engine", labels=["engine"]
        )
        in_rotation = GaugeMetricFamily(
            "longtrace_rollout_engine_in_rotation", "1 if the engine takes requests", labels=["engine"]
        )
        requests = GaugeMetricFamily(
            "longtrace_rollout_engine_requests", "Requests sent to the engine", labels=["engine"]
        )
        failures = GaugeMetricFamily(
            "longtrace_rollout_engine_failures", "Failed requests and probes", labels=["engine"]
        )
        for e in loads:
            outstanding.add_metric([e.engine_id], e.outstanding)
            in_rotation.add_metric([e.engine_id], 1.0 if e.in_rotation else 0.0)
            requests.add_metric([e.engine_id], e.num_requests)
            failures.add_metric([e.engine_id], e.num_failures)
        yield from (outstanding, in_rotation, requests, failures)


class RolloutMetrics:
    def __init__(self, window_s: float = 30.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        sample_rate, token_rate = _Rate(window_s), _Rate(window_s)
        self.samples = _RatedCounter(Counter("longtrace_rollout_samples", "Samples generated", registry=r), sample_rate)
        self.tokens = _RatedCounter(
            Counter("longtrace_rollout_tokens", "Response tokens generated", registry=r), token_rate
        )
        self.groups = Counter("longtrace_rollout_groups", "Groups published", registry=r)
        self.prompt_tokens = Counter(
            "longtrace_rollout_prompt_tokens", "Prompt tokens of the requests answered (resumes: + tokens so far)",
            registry=r,
        )  # fmt: skip
        self.cached_tokens = Counter(
            "longtrace_rollout_cached_tokens",
            "Of those, the tokens the engines reused instead of prefilling (meta_info.cached_tokens)",
            registry=r,
        )
        self.duplicates = Counter(
            "longtrace_rollout_duplicate_groups", "Groups already published (redelivered)", registry=r
        )
        self.dead_letters = Counter("longtrace_rollout_dead_letters", "Tasks given up on", registry=r)
        self.failed_groups = Counter(
            "longtrace_rollout_failed_groups",
            "Group generations whose samples failed (retried, then dead-lettered)",
            registry=r,
        )
        self.retries = Counter(
            "longtrace_rollout_retries",
            "Resubmitted requests (engine_error, overloaded, resume) and regenerated tasks (task)",
            ["reason"],
            registry=r,
        )
        self.in_flight_groups = Gauge("longtrace_rollout_in_flight_groups", "Groups being generated", registry=r)
        Gauge("longtrace_rollout_samples_per_s", f"Samples per second over {window_s:g}s", registry=r).set_function(
            sample_rate.per_s
        )
        Gauge("longtrace_rollout_tokens_per_s", f"Tokens per second over {window_s:g}s", registry=r).set_function(
            token_rate.per_s
        )
        self._http = MetricsHTTP(r)
        self.port = 0
        """The port /metrics is served on (0: not served)."""

    def watch_engines(self, snapshot: Callable[[], list[EngineLoad]]) -> None:
        self.registry.register(_EngineCollector(snapshot))

    def serve(self, host: str, port: int, span: int = 1) -> int:
        """Serve /metrics on a daemon thread, on the first free port of `port .. port + span - 1`, else on a free
        port the OS picks (as with `port` 0), and log it. Returns the port bound."""
        self.port = self._http.start(host, port, span)
        if port and not port <= self.port < port + span:
            log.warning("metrics ports %d..%d are taken; using %d", port, port + span - 1, self.port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        self._http.close()
