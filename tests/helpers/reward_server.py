"""The real `longtrace reward serve` process for tests that need real HTTP and a real event loop: started on a free
port with the given flags, waited for until /health answers, terminated (then killed) on leaving."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.net import free_port


@contextmanager
def reward_server(log: Path, *flags: str, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Run `longtrace reward serve --port P FLAGS...` (output to `log`) and yield its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port), *flags]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in a synchronous scan: SIGTERM is only handled between bytecodes
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class HealthProbe:
    """GET /health every `interval_s` in a thread while the block runs; `latencies_s` of the answers, `failures`
    for requests that got no 200 within `timeout_s`."""

    url: str
    interval_s: float = 0.05
    timeout_s: float = 2.0
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.get(f"{self.url}/health").status_code
                    if status == 200:
                        self.latencies_s.append(time.perf_counter() - start)
                    else:
                        self.failures.append(f"HTTP {status}")
                except httpx.TransportError as e:
                    self.failures.append(repr(e))
                self._stop.wait(self.interval_s)

    @contextmanager
    def running(self) -> Iterator[HealthProbe]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=self.timeout_s + 5)
