"""A /health prober on a thread: while a block runs, GET `url`/health every `interval_s` and record each answer's
latency, or a failure (no 200 within `timeout_s`). Shows a blocked event loop: the chaos bench's regex bomb
(experiments/chaos_regex_bomb.py) and the reward API's tests use it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class HealthProbe:
    url: str
    interval_s: float = 0.05
    timeout_s: float = 2.0
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        # trust_env=False: a loopback service must not be reached through a proxy from the environment.
        with httpx.Client(timeout=self.timeout_s, trust_env=False) as client:
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
        thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=self.timeout_s + 5)

    def summary(self) -> dict[str, Any]:
        return {
            "health_probes": len(self.latencies_s),
            "health_failures": len(self.failures),
            "health_max_s": round(max(self.latencies_s, default=0.0), 3),
        }
