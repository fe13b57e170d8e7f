"""EvalConfig: the typed config of `longtrace eval` (TOML + `--key value` overrides).

Defaults are the paper's evaluation protocol (METHOD.md §4): 4 samples per question at temperature 0.6,
top-p 0.95, top-k 20, 128K prompt + 32K response (160,000 tokens in all). The reward is the outcome judgment
alone (η = 0); the rubric hit fraction is recorded beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from common.config import BaseConfig, ConfigError
from common.retry import RetryConfig, move_retry_keys
from rollout_server.worker.processors import ProcessorName


class LocalConfig(BaseConfig):
    """The services `--model DIR` starts when no engine or reward URL is given."""

    num_threads: int = Field(0, ge=0)
    """torch threads of the local built-in engine (0: torch's default)."""
    max_running_requests: int = Field(32, ge=1)
    """KV-cache slots of the local engine (sequences decoded together)."""
    context_length: int = Field(0, ge=0)
    """Longest sequence of the local engine; 0: min(the model's max positions, 4096)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the local engine: auto, cpu or cuda."""
    reward_config: str = ""
    """RewardConfig TOML of the local reward API (e.g. an LLM judge); empty: the rule judge (`contains`)."""
    startup_timeout_s: float = Field(300.0, gt=0)
    """How long the local engine and reward API may take to answer /health."""


class EngineRetryConfig(RetryConfig):
    """RetryConfig of a sample whose engine failed (`[engine_retry]`, the rollout worker's `retry`)."""

    max_attempts: int = Field(3, ge=1)
    """Engine failures one sample tolerates, the first try included (1: never retried)."""
    base_s: float = Field(0.5, ge=0)
    """The first retry waits up to this long (full jitter, doubling per retry)."""
    max_backoff_s: float = Field(30.0, ge=0)
    """Cap of one backoff wait."""
    deadline_s: float = Field(86400.0, gt=0)
    """No retry starts after this long since the sample's first request; a day by default, so in effect the attempts bound it."""


class RewardRetryConfig(RetryConfig):
    """RetryConfig of a /v1/score request to the reward API (`[reward_retry]`)."""

    max_attempts: int = Field(5, ge=1)
    """Tries in all, the first included (1: never retried)."""
    base_s: float = Field(0.5, ge=0)
    """The first retry waits up to this long (full jitter, doubling per retry)."""
    max_backoff_s: float = Field(10.0, ge=0)
    """Cap of one backoff wait."""
    deadline_s: float = Field(60.0, gt=0)
    """No retry starts after this long since the first try, or after `timeout_s` when that is longer."""


class EvalConfig(BaseConfig):
    dataset_path: str
    """LongTraceRL JSONL to evaluate (datagen/dataset.py format)."""
    engine_urls: list[str] = []
    """Engine base URLs (SGLang native API); one may be an sglang-router. Empty with --model: a local engine."""
    reward_url: str = ""
    """Base URL of the reward API (`/v1/score`). Empty with --model: a local reward API (rule judge)."""
    model_path: str = ""
    """Model directory (`--model`): served by a local engine when engine_urls is empty; the default tokenizer."""
    tokenizer_path: str = ""
    """Tokenizer with the chat template; empty: model_path."""
    out_dir: str = ""
    """Where samples.jsonl and summary.json go; empty: runs/eval-<date>-<time>."""
    k: int = Field(4, ge=1)
    """Samples per question (avg@k, pass@k)."""
    temperature: float = Field(0.6, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = 20
    """Top-k cut-off; -1: the whole vocabulary."""
    max_context_len: int = Field(160000, ge=2)
    """Prompt plus response tokens at most (capped further by the engines' context length)."""
    max_response_len: int = Field(32000, ge=1)
    """Response tokens at most; an answer cut here counts wrong."""
    max_questions: int = Field(0, ge=0)
    """Questions evaluated, the first ones of the file; 0: all."""
    concurrency: int = Field(64, ge=1)
    """Requests in flight per engine URL (raise it for a router URL that fronts many engines)."""
    timeout_s: float = Field(3600.0, gt=0)
    """Timeout of one /generate or /v1/score request (a 32K-token answer can take many minutes)."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """Timeout of opening a connection (and of the engines' info endpoints)."""
    engine_retry: EngineRetryConfig = Field(default_factory=EngineRetryConfig)
    """Retries of a sample after an engine failure, each on another engine; after the last the eval fails (3
    attempts). Was `max_attempts`; still read, with a warning."""
    reward_retry: RewardRetryConfig = Field(default_factory=RewardRetryConfig)
    """Retries of a /v1/score request on transport errors and 502/503/504 (5 attempts, 0.5 s first backoff, 10 s
    cap); its deadline is raised to at least `timeout_s`."""
    processor: ProcessorName = "qwen3"
    """Message processor that parses responses (the rollout workers'): qwen3 | deepseek_r1."""
    stop_token_ids: list[int] | None = None
    """Stop token ids; unset: the processor's stop tokens looked up in the tokenizer."""
    seed: int = 0
    """Base of each sample's `sampling_seed` (reproducible on the built-in engine; SGLang needs deterministic
    inference enabled to honour it)."""
    expect_version: int | None = None
    """Fail unless every engine serves this weight version ("default" counts as 0); None: no check."""
    reward_auth_token_env: str = ""
    """Env var holding the reward API's bearer token; empty: none (never logged)."""
    reward_auth_token_file: str = ""
    """File holding the reward API's bearer token instead (never logged)."""
    engine_api_key_env: str = ""
    """Env var holding a bearer token sent to the engines (SGLang's --api-key); empty: none (never logged)."""
    engine_api_key_file: str = ""
    """File holding the engines' bearer token instead (never logged)."""
    local: LocalConfig = Field(default_factory=LocalConfig)
    """The local engine and reward API of `--model`."""

    @model_validator(mode="before")
    @classmethod
    def _moved_retry_keys(cls, data: Any) -> Any:
        return move_retry_keys(data, "", {"max_attempts": ("max_attempts", 0)}, table="engine_retry")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError("--top_k must be -1 (all) or >= 1")
        if not self.model_path and not self.engine_urls:
            raise ValueError("--engine_urls is empty: give engine URLs, or --model DIR to start a local engine")
        if not self.model_path and not self.reward_url:
            raise ValueError("--reward_url is empty: give the reward API's URL, or --model DIR to start one locally")
        if not self.model_path and not self.tokenizer_path:
            raise ValueError("--tokenizer_path is empty: give the model's tokenizer directory (or --model DIR)")
        return self

    @property
    def tokenizer(self) -> str:
        return self.tokenizer_path or self.model_path

    def reward_token(self) -> str | None:
        return _secret(self.reward_auth_token_env, self.reward_auth_token_file, "reward_auth_token")

    def engine_token(self) -> str | None:
        return _secret(self.engine_api_key_env, self.engine_api_key_file, "engine_api_key")


def _secret(env: str, file: str, flag: str) -> str | None:
    """A bearer token from a file or an env var; None when neither is named. Never logged."""
    if env and file:
        raise ConfigError(f"--{flag}_env and --{flag}_file: set at most one")
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--{flag}_file: no such file {file!r}")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"--{flag}_file: {file!r} is empty")
        return token
    if env:
        token = os.environ.get(env, "")
        if not token:
            raise ConfigError(f"--{flag}_env: environment variable {env} is unset or empty")
        return token
    return None
