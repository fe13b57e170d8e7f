"""`WeightSyncConfig`: how the learner's weights reach the engines, as a discriminated union on `type`.

`distributed` broadcasts HF-named buckets over a process group shared with the engines (NCCL on GPU,
gloo on CPU; SGLang's `/update_weights_from_distributed`); `disk` writes an HF export and has every engine
load it (`/update_weights_from_disk`); `none` pushes nothing and only advances the policy version.
TOML: `[weight_sync]` with `type = "distributed"`; CLI: `--weight_sync.type disk --weight_sync.export_dir d`.
Imports nothing heavy.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from common.config import BaseConfig
from common.retry import RetryConfig, move_retry_keys


class HttpRetryConfig(RetryConfig):
    """RetryConfig of an idempotent control call (pause, flush, version, continue, health, server info) whose
    connection failed (`[weight_sync.http_retry]`); refusals and timeouts are not retried."""

    max_attempts: int = Field(3, ge=1)
    """Tries in all, the first included (1: never retried)."""
    base_s: float = Field(0.2, ge=0)
    """The first retry waits up to this long (full jitter, doubling per retry)."""
    max_backoff_s: float = Field(2.0, ge=0)
    """Cap of one backoff wait."""
    deadline_s: float = Field(90.0, gt=0)
    """No retry starts after this long since the first try; raised to 3 x `http_timeout_s` when that is longer."""


class PushRetryConfig(RetryConfig):
    """RetryConfig of one push's attempts (`[weight_sync.push_retry]`, distributed backend): after a failed attempt
    dead engines are dropped and the group is rebuilt with the survivors, which get everything again, so none
    keeps a partial update."""

    max_attempts: int = Field(2, ge=1)
    """Attempts of one push, the first included."""
    base_s: float = Field(0.0, ge=0)
    """Wait before the second attempt (full jitter, doubling per attempt); 0: retry at once."""
    max_backoff_s: float = Field(0.0, ge=0)
    """Cap of one wait between attempts."""
    deadline_s: float = Field(3600.0, gt=0)
    """No attempt starts after this long since the push paused the engines."""


class NoSyncConfig(BaseConfig):
    type: Literal["none"] = "none"
    """Push nothing: after each push step the policy version (learner state and broker key) becomes the step."""


class _EngineSyncConfig(BaseConfig):
    """What both real backends share: which engines, cadence, HTTP control, pause and the disk export."""

    every_k_steps: int = Field(1, ge=1)
    """Push after every k-th optimizer step (the policy version then advances by k per push)."""
    engine_urls: list[str] = []
    """Static engine base URLs (http://host:port), used besides the live engines of the broker's registry."""
    use_registry: bool = True
    """Also push to the engines registered in the broker's engine registry (read at every push)."""
    http_timeout_s: float = Field(30.0, gt=0)
    """Timeout of one control call (pause, flush, version, continue, health, server info)."""
    http_retry: HttpRetryConfig = Field(default_factory=HttpRetryConfig)
    """Retries of an idempotent control call on a connection error (3 attempts, 0.2 s first backoff, 2 s cap). Was
    `http_attempts`; still read, with a warning."""
    pause_mode: Literal["abort", "retract", "in_place"] = "abort"
    """`/pause_generation` mode: abort returns partial outputs (the rollout workers resubmit them), retract
    requeues requests and recomputes their KV after the update, in_place keeps the (stale) KV cache (distributed
    backend only). With retract or in_place one answer spans the update: its `meta_info.weight_versions` labels
    each token's version."""
    pause_timeout_s: float = Field(60.0, gt=0)
    """How long pausing all engines may take."""
    flush_timeout_s: float = Field(60.0, gt=0)
    """`/flush_cache` answers 400 while requests are in flight: retry for at most this long."""
    flush_retry_interval_s: float = Field(0.2, gt=0)
    """Wait between `/flush_cache` attempts."""
    control_token_env: str = "LONGTRACE_ENGINE_API_KEY"
    """Env var holding the engines' bearer token for control endpoints (unset or empty: no Authorization header)."""
    export_dir: str = ""
    """Directory of HF exports `v<version>/` plus a `LATEST` pointer; late engines load the newest one from disk
    before they serve. Empty disables exports (required by the disk backend)."""
    export_keep_last: int = Field(2, ge=1)
    """Complete exports kept in `export_dir`; older ones are deleted after a new one is written."""
    max_consecutive_failures: int = Field(3, ge=1)
    """Raise after this many consecutive pushes in which engines existed but none received the weights."""

    @model_validator(mode="before")
    @classmethod
    def _moved_http_retry_keys(cls, data: Any) -> Any:
        return move_retry_keys(data, "weight_sync", {"http_attempts": ("max_attempts", 0)}, table="http_retry")


class DistributedSyncConfig(_EngineSyncConfig):
    type: Literal["distributed"] = "distributed"
    """Broadcast buckets over a process group shared with the engines (SGLang's update_weights_from_distributed)."""
    bucket_mb: int = Field(512, ge=1)
    """Bytes per `/update_weights_from_distributed` call, in MiB; a tensor larger than this goes alone."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend of the weight-update group: auto is nccl when CUDA is available, else gloo."""
    master_address: str = "127.0.0.1"
    """Address the engines use to reach the sending rank (each pipeline stage's leader hosts its own group).
    "auto" resolves this host's name; set a routable address when engines run on other nodes."""
    master_port: int = Field(0, ge=0, le=65535)
    """Rendezvous port of stage 0's group (stage s uses master_port + s); 0 picks a free port at every rebuild."""
    group_name: str = "longtrace_weights"
    """Prefix of the weight-update group names (`<prefix>_<random>_pp<stage>_g<generation>`: unique per learner
    process and rebuild, so a restarted learner never meets a stale group of the same name on an engine)."""
    init_timeout_s: float = Field(120.0, gt=0)
    """Deadline of building the group with the engines (rendezvous and connect)."""
    broadcast_timeout_s: float = Field(300.0, gt=0)
    """Deadline of one bucket's broadcasts (a broadcast has no timeout of its own: it runs on a guarded thread)."""
    push_retry: PushRetryConfig = Field(default_factory=PushRetryConfig)
    """Attempts of one push (2, no wait between them); after a failed attempt dead engines are dropped and the group
    is rebuilt with the survivors, so they never keep a partial update. Was `max_attempts`; still read, with a
    warning."""

    @model_validator(mode="before")
    @classmethod
    def _moved_push_retry_keys(cls, data: Any) -> Any:
        return move_retry_keys(data, "weight_sync", {"max_attempts": ("max_attempts", 0)}, table="push_retry")

    @property
    def update_timeout_s(self) -> float:
        """HTTP timeout of one bucket's `/update_weights_from_distributed`: the broadcast plus the load."""
        return self.broadcast_timeout_s + self.http_timeout_s

    @property
    def attempt_bound_s(self) -> float:
        """The longest one stage's attempt can keep the learner's other ranks waiting on a hung engine: the build
        (twice: a rebuild after a failed bucket), one bucket's broadcast deadline, then its load
        (`update_timeout_s`). `model.dist_timeout_s` must exceed it (TrainConfig checks)."""
        return 2 * self.init_timeout_s + 15 + self.broadcast_timeout_s + self.update_timeout_s + 5


class DiskSyncConfig(_EngineSyncConfig):
    type: Literal["disk"] = "disk"
    """Write an HF export and have every engine load it with /update_weights_from_disk (shared filesystem)."""
    load_timeout_s: float = Field(600.0, gt=0)
    """HTTP timeout of one engine's `/update_weights_from_disk`."""

    @model_validator(mode="after")
    def _needs_dir(self) -> DiskSyncConfig:
        if not self.export_dir:
            raise ValueError("--weight_sync.export_dir is required with --weight_sync.type disk")
        return self

    @model_validator(mode="after")
    def _pause_mode_supported(self) -> DiskSyncConfig:
        # The disk load asks the engine to flush its KV cache; SGLang 0.5.23 fails the update (weights loaded,
        # success false) while requests still hold KV, which in_place keeps: every push would fail on busy engines.
        if self.pause_mode == "in_place":
            raise ValueError(
                "--weight_sync.pause_mode in_place is not supported with --weight_sync.type disk: SGLang's "
                "/update_weights_from_disk then fails while paused requests hold KV cache; use retract or abort"
            )
        return self


WeightSyncConfig = Annotated[NoSyncConfig | DistributedSyncConfig | DiskSyncConfig, Field(discriminator="type")]
"""The `[weight_sync]` section: pick the backend with `type`."""
EngineSyncConfig = DistributedSyncConfig | DiskSyncConfig
