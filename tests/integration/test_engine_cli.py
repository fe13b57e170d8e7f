"""`longtrace engine serve` as a real process: serving, registry heartbeat in real Redis, clean shutdown, CLI errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from broker.factory import connect
from broker.settings import BrokerConfig
from rollout_server.engine.server import free_port
from rollout_server.models import init_tiny_model


def _wait(predicate: object, timeout_s: float, what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"engine exited early: {proc.stderr.read() if proc.stderr else ''}"
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_registers_heartbeats_and_deregisters_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    """Guards against an engine that workers cannot discover (no registry entry, stale version) or that
    lingers in the registry after it exits."""
    model = init_tiny_model(tmp_path / "m", hidden_size=64)
    port = free_port()
    cmd = [sys.executable, "-m", "deploy.cli", "engine", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--max_running_requests", "2", "--context_length", "128", "--engine_id", "e1"]
    cmd += [
        "--broker.redis_url",
        redis_url,
        "--broker.run_id",
        "cli-test",
        "--heartbeat_interval_s",
        "0.3",
        "--heartbeat_ttl_s",
        "3",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    broker = connect(BrokerConfig(redis_url=redis_url, run_id="cli-test"))
    try:
        _wait(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 120, "/health", proc)
        live = broker.engines.live()
        assert [(e.engine_id, e.url, e.backend, e.policy_version) for e in live] == [("e1", url, "builtin", 0)]
        r = httpx.post(
            url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}}, timeout=30
        )
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 3
        httpx.post(url + "/update_weight_version", json={"new_version": "5", "abort_all_requests": False}, timeout=10)
        _wait(lambda: broker.engines.live()[0].policy_version == 5, 10, "the heartbeat to carry version 5", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert broker.engines.live() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        broker.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "--model is required"), (["--model", "/nonexistent/model"], "no config.json"), (["--modle", "x"], "modle")],
)
def test_serve_errors_name_the_flag(args: list[str], message: str) -> None:
    """Guards against a bad or missing --model (or a typo'd flag) surfacing as a traceback instead of a message."""
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "engine", "serve", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
