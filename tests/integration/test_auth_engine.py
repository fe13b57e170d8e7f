"""Authentication and exposure of the built-in engine: bearer auth on every control endpoint (pause, flush, weight
updates, abort, weight version) checked before the body is read, generation and probes open, the body-size
limit (413), a constant-time compare, the token from env or a file and never in logs or answers, a loopback
bind by default, and no network bind without a token unless allowed (a real `longtrace engine serve` process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from experiments.fuzz import engine_config
from rollout_server.engine.api import build_app
from rollout_server.engine.engine import Engine
from rollout_server.engine.guard import CONTROL_PATHS
from rollout_server.engine.server import free_port
from rollout_server.models import init_tiny_model
from tests.helpers.auth_checks import GuardedServer, bearer, serving
from tests.helpers.reward_server import wait_health

TOKEN = "eng-4c1d8e2a9f3b7a60"  # a distinctive string to grep logs for
AUTH = bearer(TOKEN)

# A harmless authenticated call per control endpoint (each answers 200, or 400 without touching state).
CONTROL_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/flush_cache", None),
    ("POST", "/flush_cache", None),
    ("POST", "/pause_generation", {"mode": "in_place"}),
    ("POST", "/continue_generation", {}),
    ("POST", "/abort_request", {"rid": "nobody"}),
    ("POST", "/update_weight_version", {"new_version": "default", "abort_all_requests": False}),
    ("POST", "/init_weights_update_group",
     {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "mpi"}),
    ("POST", "/destroy_weights_update_group", {"group_name": "none"}),
    ("POST", "/begin_weight_update", {}),  # opens the session the next one closes
    ("POST", "/end_weight_update", {}),
    ("POST", "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}),
    ("POST", "/update_weights_from_disk", {"model_path": "/nonexistent"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny_model(tmp_path_factory.mktemp("auth-engine") / "model")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine(engine_config(model_dir, api_key_env="LT_AUTH_ENGINE", max_body_mb=0.001))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture
def server(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> GuardedServer:
    """The engine's app with its token in the env var the config names."""
    monkeypatch.setenv("LT_AUTH_ENGINE", TOKEN)
    return GuardedServer(lambda: build_app(engine), TOKEN, ("POST", "/abort_request", {}), error_key="message")


def test_control_paths_are_the_documented_ones() -> None:
    """Guards against a control endpoint added to the API but not to the guard's list (left open)."""
    assert {path for _, path, _ in CONTROL_CALLS} == CONTROL_PATHS


@pytest.mark.parametrize(("method", "path", "body"), CONTROL_CALLS, ids=[f"{m} {p}" for m, p, _ in CONTROL_CALLS])
def test_every_control_endpoint_needs_the_token(
    engine: Engine, server: GuardedServer, method: str, path: str, body: Any
) -> None:
    """Guards against an unauthenticated caller pausing, flushing, re-weighting, aborting or relabelling a
    shared engine, and against the token locking out its rightful caller."""
    for right in server.check_bearer_auth(method, path, body):
        assert right.status_code in (200, 400) and "Bearer" not in right.text, right.text
    if path == "/pause_generation":
        server.calls(("POST", "/continue_generation", {}, AUTH))
    assert not engine.scheduler.paused and engine.weight_version == "default"


def test_generation_and_probes_stay_open_and_auth_precedes_parsing(server: GuardedServer) -> None:
    """Guards against a token locking out rollout workers (they send none) and health probes, and against an
    unauthenticated caller getting validation errors (schema probing) or a 413 before its 401."""
    responses = server.calls(
        ("POST", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}, {}),
        ("GET", "/health", None, {}),
        ("GET", "/get_model_info", None, {}),
        ("GET", "/get_server_info", None, {}),
        ("GET", "/get_weight_version", None, {}),
    )
    assert [r.status_code for r in responses] == [200] * 5
    assert TOKEN not in responses[3].text  # server_info dumps the config: the env var's name, not its value
    server.check_auth_precedes_parsing("/pause_generation", "/update_weights_from_disk")


def test_body_limit_is_413_before_parsing(server: GuardedServer) -> None:
    """Guards against a client making the engine buffer and parse an arbitrarily large body: declared, lying and
    streamed (chunked) bodies over `max_body_mb` are refused with 413 naming the flag."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]" * 10

    declared, streamed, lying, fits = server.calls(
        ("POST", "/generate", b"[" * 2000, {"content-type": "application/json"}),
        ("POST", "/generate", chunks(), {"content-type": "application/json"}),
        ("POST", "/generate", b"{}", {"content-length": "-5"}),
        ("POST", "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}, {}),
    )
    assert [r.status_code for r in (declared, streamed, lying)] == [413, 413, 413]
    assert "--max_body_mb" in declared.json()["message"] and "--max_body_mb" in streamed.json()["message"]
    assert fits.status_code == 200


def test_token_compare_is_constant_time(server: GuardedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the bearer check being rewritten with `==` (its early exit is a timing oracle on the
    token's prefix): every check, right or wrong, goes through hmac.compare_digest."""
    server.check_compare_is_constant_time(monkeypatch)


def test_token_from_a_file(
    engine: Engine, server: GuardedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against secrets having to sit in the environment, and against a missing or empty token file
    silently turning auth off."""
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("LT_AUTH_ENGINE", "from-env")  # the file wins
    base = engine.config
    try:
        engine.config = base.model_copy(update={"api_key_file": str(tmp_path / "token")})
        env_token, file_token = server.calls(
            ("POST", "/abort_request", {}, {"Authorization": "Bearer from-env"}),
            ("POST", "/abort_request", {}, AUTH),
        )
        assert (env_token.status_code, file_token.status_code) == (401, 200)
        for name, message in [("missing", "no such file"), ("empty", "is empty")]:
            engine.config = base.model_copy(update={"api_key_file": str(tmp_path / name)})
            with pytest.raises(ValueError, match=f"--api_key_file: .*{message}"):
                build_app(engine)
    finally:
        engine.config = base


def test_serve_binds_loopback_and_never_logs_the_token(model_dir: Path, tmp_path: Path) -> None:
    """Guards against `longtrace engine serve` exposing its control endpoints on every interface by default, and
    against the token reaching its logs (debug level) or its answers, for right and wrong tokens alike."""
    port = free_port()
    env = {**os.environ, "LONGTRACE_ENGINE_API_KEY": TOKEN, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deploy.cli", "engine", "serve", "--model", str(model_dir), "--port", str(port),
           "--log_level", "DEBUG", "--context_length", "64"]  # fmt: skip
    log = tmp_path / "engine.log"
    with serving(cmd, env, log, port, TOKEN, start_timeout_s=120) as url:
        answers = [
            httpx.post(f"{url}/pause_generation", json={}, timeout=10),
            httpx.post(f"{url}/pause_generation", json={}, headers=bearer(f"{TOKEN}0"), timeout=10),
            httpx.post(f"{url}/abort_request", json={"abort_all": True}, headers=AUTH, timeout=10),
            httpx.get(f"{url}/get_server_info", timeout=10),
        ]
        assert [a.status_code for a in answers] == [401, 401, 200, 200]
        assert all(TOKEN not in a.text for a in answers)
    text = log.read_text()
    # the logs were captured, at debug level (the config line names the token's variable, never its value)
    assert "control auth on" in text and "DEBUG" in text and "LONGTRACE_ENGINE_API_KEY" in text


def test_serve_on_a_network_address_without_a_token_is_refused_unless_allowed(model_dir: Path, tmp_path: Path) -> None:
    """Guards against `longtrace engine serve --host 0.0.0.0` exposing the control endpoints (pause, weight
    updates) to anyone on the network with no token set: it refuses to start, naming --allow_unauthenticated and
    where the token goes; with the flag (or a token) it starts."""
    env = {k: v for k, v in os.environ.items() if k != "LONGTRACE_ENGINE_API_KEY"}
    port = free_port()
    cmd = [sys.executable, "-m", "deploy.cli", "engine", "serve", "--model", str(model_dir), "--host", "0.0.0.0",
           "--port", str(port), "--context_length", "64"]  # fmt: skip
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--allow_unauthenticated" in refused.stderr and "LONGTRACE_ENGINE_API_KEY" in refused.stderr
    assert "Traceback" not in refused.stderr
    with (tmp_path / "open.log").open("wb") as out:
        proc = subprocess.Popen([*cmd, "--allow_unauthenticated"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_health(f"http://127.0.0.1:{port}", proc, tmp_path / "open.log", 120)
        assert "without a token (--allow_unauthenticated)" in (tmp_path / "open.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
