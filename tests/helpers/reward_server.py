"""The real `longtrace reward serve` process for tests that need real HTTP and a real event loop: started on a free
port with the given flags, waited for until /health answers, terminated (then killed) on leaving."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.net import free_port
from experiments.health_probe import HealthProbe
from rollout_server.launch import wait_healthy

__all__ = ["HealthProbe", "reward_server", "wait_health"]


def wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Return once `url`/health answers 200 (rollout_server.launch's poll); fail with the process's log if it exits
    or `timeout_s` passes first."""
    assert wait_healthy(url, proc, timeout_s, probe_timeout_s=1.0), log.read_text()[-3000:]


@contextmanager
def reward_server(log: Path, *flags: str, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Run `longtrace reward serve --port P FLAGS...` (output to `log`) and yield its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port), *flags]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc, log, start_timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in a synchronous scan: SIGTERM is only handled between bytecodes
            proc.kill()
            proc.wait(timeout=10)
