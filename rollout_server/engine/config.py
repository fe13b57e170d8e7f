"""The built-in engine's typed config (`longtrace engine serve`): model, batching, limits, auth, registry."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from broker.settings import BrokerConfig
from common.config import BaseConfig

log = logging.getLogger(__name__)

UNAUTHENTICATED_RISK = "pause it, abort its requests or replace its weights"
"""What anyone could do to an engine served on the network without a token (common/exposure.py's `risk`)."""

HEALTH_GENERATION_ENV = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"
"""SGLang's switch (default on) making `/health` a one-token generation, which a paused engine cannot answer (503
after the health timeout). Every launcher sets it to "0", as slime does, so `/health` answers during weight pushes."""


def health_endpoint_generation() -> bool:
    """Whether `/health` runs the generation probe, read from HEALTH_GENERATION_ENV as SGLang reads it
    (srt/environ.py `EnvBool`: unset means on; true/1/yes/y or false/0/no/n in any case; another value warns and
    keeps the default, on)."""
    raw = os.environ.get(HEALTH_GENERATION_ENV)
    if raw is None:
        return True
    value = raw.lower()
    if value in ("false", "0", "no", "n"):
        return False
    if value not in ("true", "1", "yes", "y"):
        log.warning(
            "%s=%r is not a boolean (true/1/yes/y, false/0/no/n): on, as SGLang reads it", HEALTH_GENERATION_ENV, raw
        )
    return True


class EngineConfig(BaseConfig):
    model_path: str = ""
    """HF model directory (config.json, safetensors, tokenizer); `--model` on the command line."""
    tokenizer_path: str = ""
    """Tokenizer directory; empty means the model directory."""
    served_model_name: str = ""
    """Model name reported by /get_model_info and the OpenAI endpoints; empty means the model path."""
    host: str = "127.0.0.1"
    """Bind address. The default keeps the control endpoints off the network; any other address needs a token
    (`api_key_env` / `api_key_file`) or `allow_unauthenticated`, or the engine refuses to start."""
    port: int = Field(30000, ge=0, le=65535)
    """HTTP port (0 picks a free one)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; auto means cuda when available."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model weight and KV-cache dtype. Logits and logprobs are always computed in float32."""
    num_threads: int = Field(0, ge=0)
    """torch intra-op threads on CPU; 0 keeps torch's default (one per core)."""
    max_running_requests: int = Field(32, ge=1)
    """KV-cache slots: the most sequences decoded together in one batched forward."""
    context_length: int = Field(0, ge=0)
    """Longest sequence (prompt + output) per slot; 0 means min(model max positions, 4096)."""
    max_prefill_tokens: int = Field(8192, ge=1)
    """Padded prompt tokens per prefill forward (a longer single prompt still runs alone)."""
    enable_prefix_sharing: bool = True
    """A request whose first tokens some running request already holds copies their K/V instead of computing them
    (a group's samples prefill their prompt once; `meta_info.cached_tokens`). False computes every prompt in full,
    as SGLang's `--disable-radix-cache`."""
    weight_version: str = "default"
    """Initial weight version string (SGLang's --weight-version). Any string, as SGLang takes it; the registry and
    the rollout workers read it as a policy version (weights/version.py): "default" (the start-up weights, policy
    version 0) or ASCII digits, e.g. "7" when starting from the export of version 7."""
    return_original_logprob: bool = False
    """Return log_softmax(logits) without temperature scaling (SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB)."""
    api_key_env: str = "LONGTRACE_ENGINE_API_KEY"
    """Name of the env var holding the bearer token for control endpoints; unset or empty means no auth."""
    api_key_file: str = ""
    """File holding the bearer token instead (e.g. a mounted secret); wins over `api_key_env`. Never logged."""
    allow_unauthenticated: bool = False
    """Serve the control endpoints without a token on a non-loopback `host` (anyone who reaches the port can pause
    the engine or replace its weights). Without it, such an engine refuses to start."""
    max_body_mb: float = Field(64.0, gt=0)
    """Largest request body accepted (HTTP 413 beyond it, checked before parsing); a 128K-token prompt is ~1 MB."""
    max_concurrent_body_mb: float = Field(2048.0, gt=0)
    """Request bodies held at once by the requests in flight, from their first byte until answered (a generation
    holds its body until it ends): past it, HTTP 503 with Retry-After (`overload_retry_after_s`), as a full
    waiting queue. Bounds memory where `max_queued_requests` x `max_body_mb` would not."""
    max_request_items: int = Field(1024, ge=1)
    """Most sequences one request may ask for (prompts x n); more is refused with 400, not queued."""
    max_queued_requests: int = Field(1024, ge=1)
    """Most sequences waiting for a KV slot (SGLang's --max-queued-requests); a /generate that would exceed it is
    answered 503 with Retry-After, nothing queued (rollout workers retry it elsewhere). One asking for more than
    this at once is refused with 400."""
    overload_retry_after_s: int = Field(1, ge=1)
    """The Retry-After (seconds) of a 503 for a full waiting queue."""
    control_timeout_s: float = Field(60.0, gt=0)
    """How long a control command may wait for the scheduler thread (busy with a step) to take it. Past it the
    command is withdrawn and the call answers 503: it changed nothing. A command the scheduler took always finishes,
    and the call reports it."""
    health_timeout_s: float = Field(20.0, gt=0)
    """/health_generate (and /health with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION on) answers 503 when its one-token
    probe gets no token within this (SGLang's SGLANG_HEALTH_CHECK_TIMEOUT, 20 s), as on a paused engine."""
    weight_update_timeout_s: float = Field(600.0, gt=0)
    """Deadline of a weight-group rendezvous, of one bucket's broadcasts (a broadcast has no timeout of its own),
    or of reading a disk update's weights (past it they are dropped: weights and version stay as they were). Keep
    it below the caller's HTTP timeout (the learner's `load_timeout_s`) so the caller hears the answer."""
    broker: BrokerConfig | None = None
    """When set (`--broker.redis_url ...`), register in the broker's engine registry with a heartbeat."""
    engine_id: str = ""
    """Registry id; empty means host:port."""
    advertise_url: str = ""
    """URL other services use to reach this engine; empty means http://host:port."""
    heartbeat_interval_s: float = Field(2.0, gt=0)
    """Seconds between registry heartbeats."""
    heartbeat_ttl_s: float = Field(10.0, gt=0)
    """The registry forgets this engine this long after its last heartbeat."""
    log_level: str = "INFO"
    """Log level of the engine process."""

    def api_key(self) -> str | None:
        """The control endpoints' bearer token: from `api_key_file` if set (it must hold one), else from the env
        var `api_key_env` (unset or empty: no auth). The value is never logged."""
        if self.api_key_file:
            path = Path(self.api_key_file)
            if not path.is_file():
                raise ValueError(f"--api_key_file: no such file {self.api_key_file!r}")
            token = path.read_text().strip()
            if not token:
                raise ValueError(f"--api_key_file: {self.api_key_file!r} is empty")
            return token
        return (os.environ.get(self.api_key_env, "") if self.api_key_env else "") or None
