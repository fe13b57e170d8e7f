"""Authentication and exposure of the reward service: bearer auth before anything is parsed, a constant-time
compare, the token from env or a file and never in the logs, and a loopback bind by default (real processes)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from common.config import ConfigError
from common.net import free_port
from reward_service.app import create_app
from reward_service.config import RewardConfig
from tests.helpers.auth_checks import GuardedServer, bearer, serving

TOKEN = "rw-7f3a9c0e5b1d4e2f"  # a distinctive string to grep logs for
SCORE = {"label": "x", "extra_reward_info": {"question": "q"}, "response": "</think>x"}


def _server(config: RewardConfig) -> GuardedServer:
    return GuardedServer(lambda: create_app(config), TOKEN, ("POST", "/evaluate", SCORE), error_key="detail")


def test_auth_is_checked_before_the_body_is_read_or_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against an unauthenticated caller learning the API's validation rules (422 before 401), or
    making the server buffer a large body, and against the probes and docs requiring the token."""
    monkeypatch.setenv("LT_AUTH_REWARD", TOKEN)
    server = _server(RewardConfig(auth_token_env="LT_AUTH_REWARD", max_body_mb=0.001))
    server.check_auth_precedes_parsing("/v1/score_group", "/evaluate")
    # The scheme is case-insensitive (RFC 7235), as on the engine: one shared guard.
    assert [r.status_code for r in server.check_bearer_auth(*server.protected)] == [200, 200]
    open_paths = server.calls(
        ("GET", "/health", None, {}),
        ("GET", "/metrics", None, {}),
        ("GET", "/docs", None, {}),
        ("GET", "/openapi.json", None, {}),
    )
    assert [r.status_code for r in open_paths] == [200] * 4


def test_token_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the bearer check being rewritten with `==`, whose early exit leaks how many leading
    bytes of a guess are right (a timing oracle): every check must go through hmac.compare_digest."""
    monkeypatch.setenv("LT_AUTH_REWARD", TOKEN)
    _server(RewardConfig(auth_token_env="LT_AUTH_REWARD")).check_compare_is_constant_time(monkeypatch)


def test_token_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against secrets having to sit in the environment (a mounted secret file must work) and against a
    missing or empty file silently turning auth off."""
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    none, ok = _server(RewardConfig(auth_token_file=str(secret))).calls(
        ("POST", "/evaluate", SCORE, {}), ("POST", "/evaluate", SCORE, bearer(TOKEN))
    )
    assert (none.status_code, ok.status_code) == (401, 200)
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("LT_AUTH_REWARD", TOKEN)
    for bad, flag in [
        (RewardConfig(auth_token_file=str(tmp_path / "missing")), "--auth_token_file: no such file"),
        (RewardConfig(auth_token_file=str(tmp_path / "empty")), "is empty"),
        (RewardConfig(auth_token_file=str(secret), auth_token_env="LT_AUTH_REWARD"), "set at most one"),
        (RewardConfig(auth_token_env="LT_AUTH_UNSET_VARIABLE"), "LT_AUTH_UNSET_VARIABLE is unset"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            bad.auth_token()


def test_serve_binds_loopback_and_never_logs_the_token(tmp_path: Path) -> None:
    """Guards against `longtrace reward serve` listening on all interfaces by default, and against the token
    reaching its output (startup logs, debug logs, the access log, error answers) even when a client sends a
    wrong one or the server refuses a request."""
    port = free_port()
    env = {**os.environ, "LT_AUTH_REWARD": TOKEN, "LONGTRACE_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port),
           "--auth_token_env", "LT_AUTH_REWARD", "--access_log", "true", "--max_body_mb", "0.01"]  # fmt: skip
    log = tmp_path / "serve.log"
    with serving(cmd, env, log, port, TOKEN, start_timeout_s=60) as url:
        auth = bearer(TOKEN)
        assert httpx.post(f"{url}/evaluate", json=SCORE, headers=auth, timeout=10).status_code == 200
        wrong = httpx.post(f"{url}/evaluate", json=SCORE, headers=bearer(f"{TOKEN}x"), timeout=10)
        assert wrong.status_code == 401 and TOKEN not in wrong.text
        big = httpx.post(f"{url}/evaluate", content=b"x" * 20_000, headers=auth, timeout=10)
        assert big.status_code == 413 and TOKEN not in big.text
        bad = httpx.post(f"{url}/evaluate", json={"label": TOKEN[:4]}, headers=auth, timeout=10)
        assert bad.status_code == 422
    text = log.read_text()
    assert "auth=on" in text and "POST /evaluate" in text  # the logs were captured, at debug and access level
