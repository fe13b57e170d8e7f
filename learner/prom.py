"""The learner's Prometheus endpoint (rank 0, `[prometheus] port`; 0: off): each step's metrics, `longtrace_learner_*`.

A tracker of the step logger (`serve_exporter`, passed to learner/tracking.py's `build_metrics_logger`), fed by
the same call that writes metrics.jsonl, after it: Prometheus sees exactly the numbers metrics.jsonl records. Levels are gauges (step, policy version, staleness, losses, throughput,
weight-sync timings, groups in flight); true counts are counters, whose rates are left to PromQL: samples, loss
tokens and groups trained, weight pushes (by outcome), bytes pushed, and the run totals of admitted, dropped and
dead-lettered groups (a run total restored by a resume enters the counter once at the first step: a restart is a
counter reset to Prometheus). Every other finite number of the step is `longtrace_learner_metric{name="<key>"}`.
The dashboard over these names: deploy/grafana/longtrace.json.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from common.metrics_http import MetricsHTTP

logger = logging.getLogger(__name__)

NS = "longtrace_learner"
STALENESS_PREFIX = "staleness/"  # staleness/<lag>: groups of this step generated <lag> versions ago

# gauge name -> (metrics key, help)
GAUGES: dict[str, tuple[str, str]] = {
    "policy_version": ("policy_version", "Policy version the engines serve (the step of the last good push)"),
    "loss": ("loss", "Training loss of the step"),
    "pg_loss": ("pg_loss", "Policy-gradient loss of the step"),
    "entropy": ("entropy", "Mean token entropy of the step"),
    "grad_norm": ("grad_norm", "Gradient norm before clipping"),
    "learning_rate": ("lr", "Learning rate of the step"),
    "clip_fraction": ("clip_fraction", "Fraction of tokens whose ratio was clipped"),
    "reward_mean": ("reward_mean", "Mean reward of the step's samples"),
    "accuracy": ("accuracy", "Outcome reward mean (the judge's verdict)"),
    "response_len_mean": ("response_len_mean", "Mean response length in tokens"),
    "tokens_per_s": ("tokens_per_s", "Training throughput of the step (tokens per second)"),
    "step_seconds": ("step_s", "Wall time of the step's training"),
    "due_wait_seconds": ("due_wait_s", "Time the step waited for its groups"),
    "groups_in_flight": ("groups_in_flight", "Admitted groups not decided yet (queued, generating or scoring)"),
    "carried_groups": ("carried_groups", "Groups carried over to the next step"),
    "weight_sync_total_seconds": ("weight_sync/total_s", "Time of the last weight push"),
    "weight_sync_transfer_seconds": ("weight_sync/transfer_s", "Transfer time of the last weight push"),
    "weight_sync_pause_seconds": ("weight_sync/pause_to_continue_s", "Engines paused during the last push"),
    "weight_sync_gb_per_s": ("weight_sync/gb_per_s", "Transfer rate of the last weight push"),
    "weight_sync_engines": ("weight_sync/num_engines", "Engines the last push reached"),
}
# counter name -> (metrics key, help): the key is the step's own count, added at each step
STEP_COUNTS: dict[str, tuple[str, str]] = {
    "samples_trained": ("num_samples", "Samples trained on"),
    "loss_tokens_trained": ("num_loss_tokens", "Response tokens in the loss"),
    "weight_sync_bytes": ("weight_sync/bytes", "Bytes of weights pushed"),
}
# counter name -> (metrics key, help): the key is a run total (trainer._counters), its increase is added
RUN_TOTALS: dict[str, tuple[str, str]] = {
    "groups_trained": ("groups_trained", "Groups trained on"),
    "groups_admitted": ("groups_admitted", "Groups admitted by the feeder"),
    "groups_dropped_stale": ("groups_dropped_stale", "Groups dropped as too stale"),
    "groups_dropped_zero_variance": ("groups_dropped_zero_variance", "Groups dropped for zero reward variance"),
    "groups_dead_lettered": ("groups_dead_lettered", "Admitted groups that died upstream"),
}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


class LearnerExporter:
    """One registry of the learner's step metrics; `log` a step (the Tracker protocol), `serve` it over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge(f"{NS}_step", "Optimizer steps done", registry=r)
        self.gauges = {key: Gauge(f"{NS}_{name}", doc, registry=r) for name, (key, doc) in GAUGES.items()}
        self.staleness_mean = Gauge(
            f"{NS}_staleness_mean", "Mean staleness (versions) of the step's groups", registry=r
        )
        self.staleness_max = Gauge(
            f"{NS}_staleness_max", "Largest staleness (versions) among the step's groups", registry=r
        )
        self.staleness_groups = Gauge(
            f"{NS}_staleness_groups", "Groups of the step by staleness (versions behind)", ["lag"], registry=r
        )
        self.step_counts = {key: Counter(f"{NS}_{name}", doc, registry=r) for name, (key, doc) in STEP_COUNTS.items()}
        self.run_totals = {key: Counter(f"{NS}_{name}", doc, registry=r) for name, (key, doc) in RUN_TOTALS.items()}
        self.pushes = Counter(f"{NS}_weight_pushes", "Weight pushes by outcome (ok, failed)", ["outcome"], registry=r)
        self.other = Gauge(f"{NS}_metric", "Any other number of the step's metrics, by its key", ["name"], registry=r)
        self._seen_totals: dict[str, float] = {}
        self._lock = threading.Lock()
        self._http = MetricsHTTP(r)
        self.port = 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        with self._lock:
            self.step.set(step)
            lags: dict[int, float] = {}
            for key, raw in metrics.items():
                value = _finite(raw)
                if value is None:
                    continue
                if key in self.gauges:
                    self.gauges[key].set(value)
                elif key in self.step_counts:
                    self.step_counts[key].inc(max(value, 0.0))
                elif key in self.run_totals:
                    self._add_total(key, value)
                elif key.startswith(STALENESS_PREFIX) and key[len(STALENESS_PREFIX) :].isdigit():
                    lags[int(key[len(STALENESS_PREFIX) :])] = value
                elif key == "weight_sync/ok":
                    self.pushes.labels("ok" if value > 0 else "failed").inc()
                else:
                    self.other.labels(key).set(value)
            self._staleness(lags)

    def _add_total(self, key: str, value: float) -> None:
        """A run total's increase since the last step (the whole total at the first one); never a decrease."""
        seen = self._seen_totals.get(key, 0.0)
        if value > seen:
            self.run_totals[key].inc(value - seen)
        self._seen_totals[key] = max(seen, value)

    def _staleness(self, lags: Mapping[int, float]) -> None:
        if not lags:
            return
        self.staleness_groups.clear()
        for lag, n in sorted(lags.items()):
            self.staleness_groups.labels(str(lag)).set(n)
        groups = sum(lags.values())
        self.staleness_mean.set(sum(lag * n for lag, n in lags.items()) / groups if groups else 0.0)
        self.staleness_max.set(max((lag for lag, n in lags.items() if n > 0), default=0))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a daemon thread (port 0: a free port the OS picks); returns the port bound."""
        self.port = self._http.start(host, port)
        logger.info("learner metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        self._http.close()


def serve_exporter(host: str, port: int, is_writer: bool) -> LearnerExporter | None:
    """Rank 0's exporter served on `host:port`, a tracker for `build_metrics_logger` (learner/tracking.py); None
    when the endpoint is off (`port` 0) or on other ranks (every rank binding the port would crash all but one)."""
    if not is_writer or port == 0:
        return None
    exporter = LearnerExporter()
    exporter.serve(host, port)
    return exporter
