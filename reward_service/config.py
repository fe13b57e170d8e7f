"""The reward service's typed config: HTTP server, judge backend, reward recipe, broker and stream worker.

Loaded with `common.config.load_config(RewardConfig, path, overrides)`; every field can be set from TOML or
with `--section.key value` (e.g. `--judge.kind llm --judge.base_url http://judge:8000/v1`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from broker.settings import BrokerConfig
from common.config import BaseConfig, ConfigError
from common.retry import RetryConfig, move_retry_keys

CombinationRule = Literal["positive_only", "negative_only", "both"]


class RuleJudgeConfig(BaseConfig):
    """Outcome judge without a model, for offline runs: compares normalised answer tokens to the label."""

    kind: Literal["rule"] = "rule"
    """Selects this backend."""
    mode: Literal["exact", "contains", "f1"] = "contains"
    """exact: the answer's tokens equal the label's; contains: the label's tokens occur contiguously in the
    answer; f1: token F1 between answer and label reaches `f1_threshold`."""
    f1_threshold: Annotated[float, Field(gt=0, le=1)] = 0.8
    """Token-F1 at or above which the answer counts as correct (mode f1)."""
    answer_marker: str | None = None
    """A word after which the final answer stands (e.g. "answer"): only the tokens after its last occurrence are
    compared with the label, and a response without it is wrong. With mode exact, a list of candidates after
    the marker is wrong, and the reasoning before it (rubric entities) is not judged."""

    @field_validator("answer_marker")
    @classmethod
    def _one_word(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) != 1:
            raise ValueError(f"--judge.answer_marker {v!r}: one word")
        return v


class JudgeRetryConfig(RetryConfig):
    """RetryConfig of one judge API request (`[judge.retry]`): after a transport error, a timeout, HTTP
    408/429/5xx or a malformed body."""

    max_attempts: int = Field(4, ge=1)
    """Tries of one request in all, the first included (1: never retried)."""
    base_s: float = Field(1.0, ge=0)
    """The first retry waits up to this long (full jitter, doubling per retry)."""
    max_backoff_s: float = Field(30.0, ge=0)
    """Cap of one backoff wait."""
    deadline_s: float = Field(600.0, gt=0)
    """No retry starts after this long since the first try of a request."""


class LlmJudgeConfig(BaseConfig):
    """Outcome judge over any OpenAI-compatible chat API, with the BrowseComp-style prompt of METHOD.md §2."""

    kind: Literal["llm"] = "llm"
    """Selects this backend."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """Base URL of the API; requests go to `{base_url}/chat/completions`."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as a bearer token; unset means no Authorization header)."""
    model: str = "qwen3-235b-a22b-instruct-2507"
    """Judge model name (the LongTraceRL reference default)."""
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """Timeout of one API request: connecting, sending it and reading the answer, together."""
    retry: JudgeRetryConfig = Field(default_factory=JudgeRetryConfig)
    """Retries of one API request (4 attempts, 1 s first backoff, 30 s cap, 600 s deadline). Was `max_retries`
    (retries: attempts - 1), `backoff_base_s`, `max_backoff_s`, `deadline_s`; still read, with a warning."""
    max_asks: Annotated[int, Field(ge=1)] = 3
    """Times the judge is asked until both `extracted_final_answer:` and `correct:` parse."""
    concurrency: Annotated[int, Field(ge=1)] = 64
    """API requests in flight at once (also the connection pool size)."""
    cache_size: Annotated[int, Field(ge=0)] = 65536
    """Verdicts kept in the LRU cache keyed by (question, label, answer); 0 disables caching."""
    temperature: float | None = None
    """Sampling temperature sent to the API; None sends none (the reference uses the API default)."""
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    """Completion token limit sent to the API; None sends none."""
    extra_body: dict[str, Any] = {"thinking": {"type": "disabled"}}
    """Extra top-level request fields (the reference disables the judge's thinking this way); {} for plain APIs."""

    @model_validator(mode="before")
    @classmethod
    def _moved_retry_keys(cls, data: Any) -> Any:
        moves = {
            "max_retries": ("max_attempts", 1),
            "backoff_base_s": ("base_s", 0),
            "max_backoff_s": ("max_backoff_s", 0),
            "deadline_s": ("deadline_s", 0),
        }
        return move_retry_keys(data, "judge", moves)


JudgeConfig = Annotated[RuleJudgeConfig | LlmJudgeConfig, Field(discriminator="kind")]


class GroupRetryConfig(RetryConfig):
    """RetryConfig of scoring one group whose judge failed (`[worker.retry]`); after the last try the entry goes
    to the dead stream."""

    max_attempts: int = Field(4, ge=1)
    """Tries of one group in all, the first included (1: dead-lettered at its first judge failure)."""
    base_s: float = Field(2.0, ge=0)
    """The first retry waits up to this long (full jitter, doubling per retry)."""
    max_backoff_s: float = Field(60.0, ge=0)
    """Cap of one backoff wait."""
    deadline_s: float = Field(86400.0, gt=0)
    """No retry starts after this long since the first try; a day by default, so in effect the attempts bound it (the judge's own
    deadline bounds each try)."""


class WorkerConfig(BaseConfig):
    """The stream worker: consumes `rollouts` in a consumer group, publishes to `scored`."""

    group: str = "reward"
    """Consumer group on the `rollouts` stream; replicas sharing it share the work."""
    consumer: str = ""
    """This replica's consumer name; empty means `<hostname>-<pid>`. Reuse a name to resume its pending entries."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Groups fetched per read."""
    concurrency: Annotated[int, Field(ge=1)] = 16
    """Groups scored at once (their samples are judged concurrently, bounded by the judge)."""
    retry: GroupRetryConfig = Field(default_factory=GroupRetryConfig)
    """In-process retries of a group whose judge failed (4 attempts, 2 s first backoff, 60 s cap). Was
    `max_group_retries` (retries: attempts - 1) and `retry_backoff_s`; still read, with a warning."""
    max_entry_mb: Annotated[float, Field(gt=0)] = 64.0
    """A group whose encoded entry is larger goes to the dead stream unscored (a runaway or hostile producer)."""
    zero_ill_formed: bool = True
    """Training mode: truncated, aborted, ill-formed and unfinished samples get 0 without a judge call."""
    score_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    """One try at scoring a group takes at most this long (its judge calls and rubric scans); past it the try
    fails as a judge failure does: retried with `[worker.retry]`, then the group goes to the dead stream with the
    reason. Above the LLM judge's own request timeout, so a slow but working judge is not cut off."""
    publish_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """How long to wait for room in `scored` (backpressure) before giving up on the process."""
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """On SIGTERM, in-flight groups get this long to finish; unfinished ones stay pending for another replica."""
    metrics: bool = True
    """Serve the worker's Prometheus /metrics (`reward_worker_groups_total`, `reward_judge_*`, ...: the registry of
    reward_service/metrics.py) on a thread; the HTTP API serves the same registry on its own port."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9350
    """First port tried for /metrics: the first free one of `metrics_port .. metrics_port + metrics_port_span - 1`
    (several workers on one host: 9350, 9351, ...), else one the OS picks; the port is logged. 0: a free one."""
    metrics_port_span: Annotated[int, Field(ge=1)] = 16
    """How many ports from `metrics_port` are tried (the compose scrape config lists the same range)."""
    metrics_host: str = "127.0.0.1"
    """Address the /metrics endpoint binds to (loopback unless told otherwise, like every service)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_retry_keys(cls, data: Any) -> Any:
        moves = {"max_group_retries": ("max_attempts", 1), "retry_backoff_s": ("base_s", 0)}
        return move_retry_keys(data, "worker", moves)

    def consumer_name(self) -> str:
        return self.consumer or f"{socket.gethostname()}-{os.getpid()}"


class RewardConfig(BaseConfig):
    """Everything `longtrace reward serve` and `longtrace reward worker` need."""

    host: str = "127.0.0.1"
    """Bind address of the HTTP API (loopback unless told otherwise)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 7248
    """Port of the HTTP API (the LongTraceRL reference port)."""
    auth_token_env: str = ""
    """Environment variable holding a bearer token the API requires; empty means no auth. Never logged."""
    auth_token_file: str = ""
    """File holding the bearer token instead (e.g. a mounted secret); set at most one of the two. Never logged."""
    allow_unauthenticated: bool = False
    """Serve the API without a token on a non-loopback `host` (anyone who reaches the port can have requests scored
    at the expense of this CPU and the judge). Without it, `reward serve` so configured refuses to start."""
    max_body_mb: Annotated[float, Field(gt=0)] = 64.0
    """Largest request body accepted (HTTP 413 beyond it); LongTraceRL histories carry the 128K-token prompt."""
    max_concurrent_body_mb: Annotated[float, Field(gt=0)] = 256.0
    """Request bodies held at once by the requests in flight, from their first byte until answered (a parsed body
    takes several times its size); a body that would exceed it gets HTTP 503 with Retry-After. A body arriving
    while no other is held is always taken, so a value below `max_body_mb` serialises the largest ones."""
    max_batch: Annotated[int, Field(ge=1)] = 4096
    """Most samples in one /v1/score or /v1/score_group request."""
    request_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """Scoring one request takes at most this long (HTTP 504 beyond it), as the reference's 600 s."""
    access_log: bool = False
    """uvicorn's per-request access log (costs throughput)."""
    num_processes: Annotated[int, Field(ge=1)] = 1
    """HTTP API worker processes sharing the port (uvicorn's supervisor restarts one that dies). Each has its own
    judge connection pool (`judge.concurrency` each), verdict cache, body budget (`max_concurrent_body_mb` each)
    and Prometheus counters: /metrics reports the process that answered. More than the free cores only adds
    switching; one core's worth of scoring is about a thousand 32 KB requests a second."""
    judge: JudgeConfig = Field(default_factory=lambda: RuleJudgeConfig())
    """Outcome judge backend: `rule` (offline) or `llm` (OpenAI-compatible API, the paper's setup)."""
    eta: Annotated[float, Field(ge=0, le=1)] = 0.3
    """rubric_reward_ratio η: weight of the rubric reward; a request's own `rubric_reward_ratio` wins."""
    combination: CombinationRule = "positive_only"
    """Group rule (METHOD.md §2): positive_only (the paper), negative_only, or both (positive & negative)."""
    normalize_rubric: bool = True
    """Divide each rubric reward by the group's maximum when that is > 0 (`--normalize-rubric-reward`)."""
    rubric_use_reasoning_content: bool = False
    """Default of the request flag: scan the assistant's reasoning (thinking) for rubric entities."""
    rubric_use_content: bool = True
    """Default of the request flag: scan the assistant's final answer for rubric entities (the paper's recipe)."""
    broker: BrokerConfig = Field(default_factory=lambda: BrokerConfig.model_validate({}))
    """Redis and run namespace (the worker only)."""
    worker: WorkerConfig = Field(default_factory=lambda: WorkerConfig())
    """The stream worker."""

    def auth_token(self) -> str | None:
        """The bearer token from `auth_token_file` or `auth_token_env`, or None when auth is off; ConfigError if
        the named file or variable holds none."""
        if self.auth_token_file:
            if self.auth_token_env:
                raise ConfigError("--auth_token_file and --auth_token_env: set at most one")
            path = Path(self.auth_token_file)
            if not path.is_file():
                raise ConfigError(f"--auth_token_file: no such file {self.auth_token_file!r}")
            token = path.read_text().strip()
            if not token:
                raise ConfigError(f"--auth_token_file: {self.auth_token_file!r} is empty")
            return token
        if not self.auth_token_env:
            return None
        token = os.environ.get(self.auth_token_env, "")
        if not token:
            raise ConfigError(f"--auth_token_env: environment variable {self.auth_token_env} is unset or empty")
        return token
