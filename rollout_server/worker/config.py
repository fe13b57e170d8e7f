"""RolloutConfig: the typed config of `longtrace rollout worker` (TOML + `--section.key value` overrides).

Precedence for sampling: a field a task sets (differs from broker.schemas.SamplingParams' default) overrides
the `[sampling]` section here, which overrides the message processor's stop token ids.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from broker.settings import BrokerConfig
from common.config import BaseConfig
from common.retry import RetryConfig, move_retry_keys
from rollout_server.worker.processors import ProcessorName

log = logging.getLogger(__name__)


class EnginesConfig(BaseConfig):
    urls: list[str] = []
    """Static engine base URLs (http://host:port), used besides the live engines of the registry."""
    use_registry: bool = True
    """Also route to the engines registered in the broker's engine registry (refreshed periodically)."""
    registry_refresh_s: float = Field(default=2.0, gt=0)
    """How often the live engines are re-read from the registry."""


class BuiltinRouterConfig(BaseConfig):
    type: Literal["builtin"] = "builtin"
    """Route each request to the live engine with the fewest outstanding requests."""
    max_inflight_per_engine: int = Field(default=64, ge=1)
    """Requests in flight on one engine at most (the others wait for a free slot)."""
    health_interval_s: float = Field(default=5.0, gt=0)
    """How often every engine's /health is probed."""
    failure_threshold: int = Field(default=2, ge=1)
    """Consecutive failures (requests or health probes) that take an engine out of rotation."""
    cooldown_s: float = Field(default=5.0, gt=0)
    """An engine out of rotation is probed again after this long; it returns on a passing health check."""
    engine_wait_timeout_s: float = Field(default=300.0, gt=0)
    """How long a request waits for any engine to be available before the attempt fails."""


class SglangRouterConfig(BaseConfig):
    type: Literal["sglang_router"] = "sglang_router"
    """Forward every request to one sglang-router (SGLang's own load balancer), which picks the engine."""
    url: str
    """Base URL of the sglang-router."""
    max_inflight: int = Field(default=1024, ge=1)
    """Requests in flight through the router at most."""


def _router_type(value: Any) -> str:
    """The router section's `type`; a section that leaves it out is the builtin router."""
    if isinstance(value, dict):
        return str(value.get("type", "builtin"))
    return str(getattr(value, "type", "builtin"))


RouterConfig = Annotated[
    Annotated[BuiltinRouterConfig, Tag("builtin")] | Annotated[SglangRouterConfig, Tag("sglang_router")],
    Discriminator(_router_type),
]


class SamplingConfig(BaseConfig):
    num_samples: int = Field(default=8, ge=1)
    """Samples per group (n) unless the task says otherwise."""
    max_response_len: int = Field(default=32000, ge=1)
    """Most tokens generated per sample."""
    max_context_len: int = Field(default=160000, ge=2)
    """Prompt plus response tokens at most: max_new_tokens = min(max_response_len, max_context_len - prompt_len)."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k cut-off, -1 for the whole vocabulary."""
    stop_token_ids: list[int] | None = None
    """Token ids that end a sample; unset: the message processor's (Qwen3: 151643, 151645; DeepSeek-R1: 151645)."""
    ignore_eos: bool = False
    """Generate past EOS and stop ids up to max_new_tokens (equal-length samples for benchmarks and tests)."""
    routing_replay: bool = False
    """Rollout routing replay (MoE models, the learner's --model.routing_replay): ask the engines for each sample's
    routed experts (`return_routed_experts`) and store them beside the group in Redis, one key per sample
    (broker/routing.py); the entry carries only the key."""
    routing_ttl_s: float = Field(default=86400.0, gt=0)
    """Lifetime of a stored routing: longer than a group can wait between generation and the learner's ack (scoring,
    max_staleness steps in the queues, carried steps, then the checkpoint interval before the ack). The learner
    deletes the keys once it acks the group (after that checkpoint); the TTL only reaps the ones nobody reads."""

    @model_validator(mode="after")
    def _check_top_k(self) -> SamplingConfig:
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError("--sampling.top_k must be -1 (all) or >= 1")
        return self


class SampleRetryConfig(RetryConfig):
    """RetryConfig of a sample whose engine failed (`[retry]`); after the last try the sample fails its group."""

    max_attempts: int = Field(5, ge=1)
    """Engine failures one sample tolerates, the first try included (1: never retried)."""
    base_s: float = Field(0.5, ge=0)
    """The first retry waits up to this long (full jitter, doubling per retry)."""
    max_backoff_s: float = Field(30.0, ge=0)
    """Cap of one backoff wait."""
    deadline_s: float = Field(86400.0, gt=0)
    """No retry starts after this long since the sample's first request; a day by default, so in effect the attempts bound it."""


class TaskRetryConfig(RetryConfig):
    """RetryConfig of a whole task whose samples failed (`[task_retry]`): after its last attempt the task goes to the
    dead stream with the samples' error, so a failed task is never held by a live worker."""

    max_attempts: int = Field(3, ge=1)
    """Generations of a task whose samples failed (each sample already retried per `[retry]`), the first included;
    then it is dead-lettered."""
    base_s: float = Field(10.0, ge=0)
    """The first retry of the task waits up to this long (full jitter, doubling per retry): time for an engine to
    come back."""
    max_backoff_s: float = Field(120.0, ge=0)
    """Cap of one backoff wait."""
    deadline_s: float = Field(86400.0, gt=0)
    """No retry starts after this long since the task's first generation began; a day by default, so in effect the
    attempts bound it."""


class RolloutConfig(BaseConfig):
    broker: BrokerConfig = Field(default_factory=lambda: BrokerConfig.model_validate({}))
    """Which Redis and run (the `tasks` and `rollouts` streams, the engine registry)."""
    worker_id: str = ""
    """Consumer name in the tasks consumer group; empty: <hostname>-<pid>. Keep it stable across restarts."""
    consumer_group: str = "rollout-workers"
    """Consumer group of the workers on the `tasks` stream."""
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    """Where the engines are."""
    router: RouterConfig = Field(default_factory=BuiltinRouterConfig)
    """How requests are spread over engines: `builtin` (least outstanding) or `sglang_router`."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Defaults of the sampling parameters."""
    processor: ProcessorName = "qwen3"
    """Message processor that parses responses: qwen3 | deepseek_r1."""
    max_groups_in_flight: int = Field(default=16, ge=1)
    """Groups generated concurrently by this worker (each sends its n samples at once)."""
    request_timeout_s: float = Field(default=3600.0, gt=0)
    """Timeout of one /generate call (a 32K-token response can take many minutes)."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of opening a connection to an engine."""
    health_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of one /health probe."""
    retry: SampleRetryConfig = Field(default_factory=SampleRetryConfig)
    """Retries of a sample after an engine failure (connection, timeout, 5xx), each on another engine (5 attempts,
    0.5 s first backoff). Was `max_attempts` and `retry_backoff_s`; still read, with a warning."""
    task_retry: TaskRetryConfig = Field(default_factory=TaskRetryConfig)
    """Retries of a task whose group failed (a sample failed all its `[retry]` attempts) on this worker, with
    backoff (3 attempts, 10 s first backoff); then the task is dead-lettered with the reason. The worker goes on
    with other tasks meanwhile."""
    resume_timeout_s: float = Field(default=600.0, gt=0)
    """After a pause-with-abort, how long to wait for the engine to generate again before failing over."""
    resume_poll_s: float = Field(default=0.2, gt=0)
    """Poll interval while waiting for a paused engine."""
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    """On SIGTERM, how long in-flight groups may finish; the rest stay unacked and are reclaimed by others."""
    publish_retry_s: float = Field(default=5.0, gt=0)
    """Wait between publish attempts while the rollouts stream stays full (backpressure)."""
    metrics: bool = True
    """Serve the Prometheus /metrics endpoint (`longtrace_rollout_*`; rollout_server/worker/metrics.py)."""
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    """First port tried for /metrics: the worker binds the first free one of `metrics_port .. metrics_port +
    metrics_port_span - 1` (several workers on one host: 9400, 9401, ...), else one the OS picks, and logs it;
    0: always one the OS picks."""
    metrics_port_span: int = Field(default=16, ge=1)
    """How many ports from `metrics_port` are tried (the scrape config lists the same range)."""
    metrics_host: str = "127.0.0.1"
    """Address the /metrics endpoint binds to (loopback unless told otherwise, like every service)."""
    initial_policy_version: int = Field(default=0, ge=0)
    """The policy version of an engine that reports SGLang's weight_version "default" (its start-up weights;
    weights/version.py): 0, the learner's starting weights, unless the engines start from a later export without
    --weight-version. Was `default_weight_version`; still read, with a warning."""

    @model_validator(mode="before")
    @classmethod
    def _moved_retry_keys(cls, data: Any) -> Any:
        return move_retry_keys(data, "", {"max_attempts": ("max_attempts", 0), "retry_backoff_s": ("base_s", 0)})

    @model_validator(mode="before")
    @classmethod
    def _renamed_version_key(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "default_weight_version" not in data:
            return data
        if "initial_policy_version" in data:
            raise ValueError(
                "--default_weight_version is deprecated and --initial_policy_version is set too: keep the latter"
            )
        log.warning("--default_weight_version is deprecated: use --initial_policy_version")
        data = dict(data)
        data["initial_policy_version"] = data.pop("default_weight_version")
        return data

    @model_validator(mode="after")
    def _check_engines(self) -> RolloutConfig:
        if isinstance(self.router, BuiltinRouterConfig) and not (self.engines.urls or self.engines.use_registry):
            raise ValueError("no engines: set --engines.urls or --engines.use_registry true")
        return self
