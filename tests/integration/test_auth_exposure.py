"""Exposure defaults: every process that listens binds 127.0.0.1 unless configured otherwise, and tokens are
configured by naming where they live (an env var or a file), never by value on the command line or in TOML."""

from __future__ import annotations

import inspect

from broker.embedded import EmbeddedRedis
from deploy.cli import build_parser
from reward_service.config import RewardConfig
from rollout_server.engine.config import EngineConfig
from rollout_server.launch import LaunchConfig
from rollout_server.worker.config import RolloutConfig


def test_service_configs_bind_loopback_by_default() -> None:
    """Guards against a default that exposes a service (scoring, the engine's control endpoints) to the network."""
    assert RewardConfig().host == "127.0.0.1"
    assert EngineConfig().host == "127.0.0.1"
    assert LaunchConfig().host == "127.0.0.1"
    assert inspect.signature(EmbeddedRedis).parameters["host"].default == "127.0.0.1"


def test_cli_bind_flags_default_to_loopback() -> None:
    """Guards against a CLI flag default overriding the config's loopback default (`--host` left unset)."""
    parser = build_parser()
    assert parser.parse_args(["redis"]).host == "127.0.0.1"
    assert parser.parse_args(["reward", "serve"]).host is None  # None: the config's default applies
    assert parser.parse_known_args(["engine", "serve"])[0].host is None


def test_rollout_worker_metrics_bind_loopback_by_default() -> None:
    """Guards against the rollout worker's Prometheus endpoint listening on every interface by default."""
    assert RolloutConfig().metrics_host == "127.0.0.1"


def test_secrets_are_named_not_given() -> None:
    """Guards against a config field that takes a token by value (it would end up in argv, visible to every
    local user through `ps`, or in a committed TOML): auth settings name an env var or a file."""
    for config in (RewardConfig, EngineConfig):
        words = {"token", "key", "password", "secret"}
        secret_fields = [name for name in config.model_fields if words & set(name.split("_"))]
        assert secret_fields, config
        assert all(name.endswith(("_env", "_file")) for name in secret_fields), secret_fields
