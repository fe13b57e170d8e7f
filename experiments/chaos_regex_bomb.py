"""The chaos bench's regex_bomb scenario (experiments/chaos_scenarios.py lists them all): `regex_bomb_mb` of
repeated `<useful_chunks>` tags posted to the reward API's /evaluate while training, with /health probed every
0.2 s meanwhile. A quadratic scan in the handler would block the event loop: no answer within the request
deadline, and /health hanging with it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from broker.schemas import DeadLetter
from experiments.chaos_accounting import Accounting
from experiments.chaos_config import ChaosConfig
from experiments.chaos_scenarios import Injector


class RegexBomb(Injector):
    """Posts the bomb to /evaluate from a thread once `warmup_steps` steps are logged, probing /health meanwhile."""

    def __init__(self, cfg: ChaosConfig, launcher: Any) -> None:
        super().__init__(cfg, launcher)
        self.thread: threading.Thread | None = None
        self.result: dict[str, Any] = {}
        self.steps_before = 0
        self.steps_after: int | None = None

    def tick(self) -> None:
        if self.thread is None and self.in_phase() and self.steps() >= self.cfg.warmup_steps:
            self.steps_before = self.steps()
            self.thread = threading.Thread(target=self._bomb, name="regex-bomb", daemon=True)
            self.thread.start()
        elif self.thread is not None and not self.thread.is_alive() and self.steps_after is None:
            self.steps_after = self.steps()

    def _bomb(self) -> None:
        import httpx

        url = self.launcher.reward_url
        n = int(self.cfg.regex_bomb_mb * 2**20 / len("<useful_chunks>"))
        body = {
            "label": "x",
            "response": "<useful_chunks><CHUNK_1></useful_chunks>" + "<useful_chunks>" * n,
            "extra_reward_info": {"rubrics": [1, 2], "dataset_name": "longrlvr", "rubric_reward_ratio": 1.0},
        }
        health = _HealthProbe(f"{url}/health")
        health.start()
        t0 = time.perf_counter()
        try:
            resp = httpx.post(f"{url}/evaluate", json=body, timeout=120.0, trust_env=False)
            self.result = {"status": resp.status_code, "evaluate_s": round(time.perf_counter() - t0, 2)}
        except httpx.HTTPError as e:
            self.result = {"status": None, "error": repr(e), "evaluate_s": round(time.perf_counter() - t0, 2)}
        finally:
            health.stop()
        self.result |= {"body_mb": round(len(body["response"]) / 2**20, 2), **health.summary()}

    def pending(self) -> list[str]:
        return [] if self.steps_after is not None else ["regex_bomb"]

    def report(self) -> dict[str, Any]:
        return {**self.result, "steps_before": self.steps_before, "steps_after": self.steps_after}

    def check(self, acc: Accounting, letters: list[DeadLetter]) -> list[str]:
        out = []
        if self.result.get("status") not in (200, 504):
            out.append(f"/evaluate answered {self.result.get('status')} ({self.result.get('error', '')})")
        if self.result.get("health_failures", 1) or self.result.get("health_max_s", 99.0) > 2.0:
            out.append(f"/health did not answer within 2 s during the bomb: {self.result}")
        return out


class _HealthProbe:
    """GETs a /health URL every 0.2 s on a thread; records latencies and failures (timeouts of 5 s)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies_s: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    client.get(self.url).raise_for_status()
                    self.latencies_s.append(time.perf_counter() - t0)
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self._stop.wait(0.2)

    def summary(self) -> dict[str, Any]:
        return {
            "health_probes": len(self.latencies_s),
            "health_failures": len(self.failures),
            "health_max_s": round(max(self.latencies_s, default=0.0), 3),
        }
