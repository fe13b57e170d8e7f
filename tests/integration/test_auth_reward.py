"""Authentication and exposure of the reward service: bearer auth before anything is parsed, a constant-time
compare, the token from env or a file and never in the logs, and a loopback bind by default (real processes)."""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from broker.config import ConfigError
from broker.embedded import free_port
from reward_service.app import create_app
from reward_service.config import RewardConfig

TOKEN = "rw-7f3a9c0e5b1d4e2f"  # a distinctive string to grep logs for
SCORE = {"label": "x", "extra_reward_info": {"question": "q"}, "response": "</think>x"}


def _requests(config: RewardConfig, *calls: tuple[str, str, Any, dict[str, str]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(config)), base_url="http://t") as c:
            out = []
            for method, path, body, headers in calls:
                kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
                out.append(await c.request(method, path, headers=headers, **kw))
            return out

    return asyncio.run(main())


def test_auth_is_checked_before_the_body_is_read_or_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against an unauthenticated caller learning the API's validation rules (422 before 401), or
    making the server buffer a large body, and against the probes and docs requiring the token."""
    monkeypatch.setenv("LT_AUTH_REWARD", TOKEN)
    config = RewardConfig(auth_token_env="LT_AUTH_REWARD", max_body_mb=0.001)
    malformed, big, ok, health, metrics, docs, schema, lower, scheme = _requests(
        config,
        ("POST", "/v1/score_group", b"{not json", {"content-type": "application/json"}),
        ("POST", "/evaluate", b"x" * 10_000, {}),
        ("POST", "/evaluate", SCORE, {"authorization": f"Bearer {TOKEN}"}),
        ("GET", "/health", None, {}),
        ("GET", "/metrics", None, {}),
        ("GET", "/docs", None, {}),
        ("GET", "/openapi.json", None, {}),
        ("POST", "/evaluate", SCORE, {"authorization": f"bearer {TOKEN.upper()}"}),
        ("POST", "/evaluate", SCORE, {"authorization": f"bearer {TOKEN}"}),
    )
    assert malformed.status_code == 401 and big.status_code == 401
    assert malformed.json()["detail"] and malformed.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200
    assert [r.status_code for r in (health, metrics, docs, schema)] == [200] * 4
    assert lower.status_code == 401  # the token itself is case-sensitive
    assert scheme.status_code == 200  # the scheme is not (RFC 7235), as on the engine: one shared guard


def test_token_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the bearer check being rewritten with `==`, whose early exit leaks how many leading
    bytes of a guess are right (a timing oracle): every check must go through hmac.compare_digest."""
    seen: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return compare(a, b)

    monkeypatch.setattr("broker.asgi_guard.hmac.compare_digest", recording)
    monkeypatch.setenv("LT_AUTH_REWARD", TOKEN)
    config = RewardConfig(auth_token_env="LT_AUTH_REWARD")
    wrong, right = _requests(
        config,
        ("POST", "/evaluate", SCORE, {"authorization": f"Bearer {TOKEN[:-1]}X"}),
        ("POST", "/evaluate", SCORE, {"authorization": f"Bearer {TOKEN}"}),
    )
    assert (wrong.status_code, right.status_code) == (401, 200)
    assert [given for given, _ in seen] == [f"{TOKEN[:-1]}X".encode(), TOKEN.encode()]  # the credential part


def test_token_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against secrets having to sit in the environment (a mounted secret file must work) and against a
    missing or empty file silently turning auth off."""
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    config = RewardConfig(auth_token_file=str(secret))
    none, ok = _requests(
        config, ("POST", "/evaluate", SCORE, {}), ("POST", "/evaluate", SCORE, {"authorization": f"Bearer {TOKEN}"})
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


def _listening(pid: int) -> list[str]:
    return [c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def test_serve_binds_loopback_and_never_logs_the_token(tmp_path: Path) -> None:
    """Guards against `longtrace reward serve` listening on all interfaces by default, and against the token
    reaching its output (startup logs, debug logs, the access log, error answers) even when a client sends a
    wrong one or the server refuses a request."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LT_AUTH_REWARD": TOKEN, "LONGTRACE_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port),
           "--auth_token_env", "LT_AUTH_REWARD", "--access_log", "true", "--max_body_mb", "0.01"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert set(_listening(proc.pid)) == {"127.0.0.1"}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.post(f"{url}/evaluate", json=SCORE, headers=auth, timeout=10).status_code == 200
        wrong = httpx.post(f"{url}/evaluate", json=SCORE, headers={"Authorization": f"Bearer {TOKEN}x"}, timeout=10)
        assert wrong.status_code == 401 and TOKEN not in wrong.text
        big = httpx.post(f"{url}/evaluate", content=b"x" * 20_000, headers=auth, timeout=10)
        assert big.status_code == 413 and TOKEN not in big.text
        bad = httpx.post(f"{url}/evaluate", json={"label": TOKEN[:4]}, headers=auth, timeout=10)
        assert bad.status_code == 422
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    text = log.read_text()
    assert "auth=on" in text and "POST /evaluate" in text  # the logs were captured, at debug and access level
    assert TOKEN not in text
