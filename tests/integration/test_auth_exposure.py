"""Exposure defaults: every process that listens binds 127.0.0.1 unless configured otherwise, a service bound to any
other address without a token refuses to start unless told `--allow_unauthenticated`, and tokens are configured by
naming where they live (an env var or a file), never by value on the command line or in TOML."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from broker.embedded import EmbeddedRedis
from common.config import ConfigError
from common.exposure import check_exposure, is_loopback
from common.net import free_port
from deploy.cli import build_parser
from reward_service.config import RewardConfig
from rollout_server.engine.config import EngineConfig
from rollout_server.launch import LaunchConfig
from rollout_server.worker.config import RolloutConfig
from tests.helpers.reward_server import reward_server


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


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
)
def test_loopback_binds_need_no_token(host: str) -> None:
    """Guards against the exposure check refusing (or warning about) a bind only this machine can reach."""
    assert is_loopback(host)
    check_exposure(host, has_token=False, allow_unauthenticated=False, what="svc", token_hint="--token_env")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.12", "node7.cluster", "::ffff:10.0.0.1"])
def test_a_non_loopback_bind_without_a_token_is_refused_unless_allowed(host: str) -> None:
    """Guards against a service on a network address serving anyone without a token by accident: refused with the
    flag that allows it and where the token goes; a token, or the explicit flag, lets it start."""
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="--allow_unauthenticated") as e:
        check_exposure(host, has_token=False, allow_unauthenticated=False, what="svc", token_hint="--token_env")
    assert "--token_env" in str(e.value) and repr(host) in str(e.value)
    check_exposure(host, has_token=True, allow_unauthenticated=False, what="svc", token_hint="--token_env")
    check_exposure(host, has_token=False, allow_unauthenticated=True, what="svc", token_hint="--token_env")


def test_reward_serve_on_a_network_address_needs_a_token_or_the_flag(tmp_path: Path) -> None:
    """Guards against `longtrace reward serve --host 0.0.0.0` without a token serving scoring to the network: it
    exits 2 naming --allow_unauthenticated and the token flags; with the flag it starts and warns."""
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "--allow_unauthenticated" in refused.stderr and "--auth_token_env" in refused.stderr
    log = tmp_path / "serve.log"
    with reward_server(log, "--host", "0.0.0.0", "--allow_unauthenticated") as url:
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert "without a token" in log.read_text()
