"""The chaos bench's regex_bomb scenario (experiments/chaos_scenarios.py lists them all): `regex_bomb_mb` of
repeated `<useful_chunks>` tags posted to the reward API's /evaluate while training, with /health probed every
0.05 s meanwhile. A quadratic scan in the handler would block the event loop: no answer within the request
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
from experiments.health_probe import HealthProbe


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
        t0 = time.perf_counter()
        with HealthProbe(url, timeout_s=5.0).running() as health:
            while not (health.latencies_s or health.failures) and time.perf_counter() - t0 < 5.0:
                time.sleep(0.01)  # a first answer before the bomb: /health is known to answer at all
            t0 = time.perf_counter()
            try:
                resp = httpx.post(f"{url}/evaluate", json=body, timeout=120.0, trust_env=False)
                self.result = {"status": resp.status_code, "evaluate_s": round(time.perf_counter() - t0, 2)}
            except httpx.HTTPError as e:
                self.result = {"status": None, "error": repr(e), "evaluate_s": round(time.perf_counter() - t0, 2)}
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
        if not self.result.get("health_probes"):
            out.append("/health never answered around the bomb (the probe saw nothing)")
        if self.result.get("evaluate_s", 99.0) > 10.0:  # the quadratic scan took minutes at 1 MB
            out.append(f"/evaluate took {self.result.get('evaluate_s')} s for the bomb (over 10 s)")
        return out
