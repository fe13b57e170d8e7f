"""Prometheus metrics of the reward service, in one registry of its own (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600)

REQUESTS = Counter(
    "reward_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "reward_http_request_seconds", "HTTP request latency by route", ["route"], buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)  # fmt: skip
SAMPLES = Counter(
    "reward_samples", "Samples by outcome of scoring (scored, zeroed, no_answer)", ["how"], registry=REGISTRY
)
ERRORS = Counter("reward_errors", "Errors by kind (judge, timeout, bad_request, ...)", ["kind"], registry=REGISTRY)
JUDGE_CALLS = Counter(
    "reward_judge_calls", "Verdicts requested from the judge backend, by result (yes, no, error)", ["judge", "result"],
    registry=REGISTRY,
)  # fmt: skip
JUDGE_API_REQUESTS = Counter(
    "reward_judge_api_requests", "HTTP requests to the LLM judge API, by outcome", ["outcome"], registry=REGISTRY
)
JUDGE_SECONDS = Histogram(
    "reward_judge_seconds", "Time to a verdict (including re-asks and retries)", ["judge"], buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)  # fmt: skip
JUDGE_CACHE_HITS = Counter(
    "reward_judge_cache_hits", "Verdicts served from the cache or joined to an identical in-flight call", ["where"],
    registry=REGISTRY,
)  # fmt: skip
WORKER_GROUPS = Counter(
    "reward_worker_groups", "Groups handled by the stream worker, by result (scored, retried, dead)", ["result"],
    registry=REGISTRY,
)  # fmt: skip
