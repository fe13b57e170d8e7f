"""Two built-in engines behind SGLang's own router (sglang-router), exactly as real SGLang workers sit behind it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer, free_port
from rollout_server.models import init_tiny_model

pytest.importorskip("sglang_router")


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[Engine]]]:
    model = init_tiny_model(tmp_path_factory.mktemp("router") / "m", seed=0)
    engines = [
        Engine(EngineConfig(model_path=str(model), max_running_requests=4, context_length=256)) for _ in range(2)
    ]
    for e in engines:
        e.start()
    with BackgroundServer(build_app(engines[0])) as a, BackgroundServer(build_app(engines[1])) as b:
        port = free_port()
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", a.url, b.url]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin", "--log-level", "warn"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            # The router answers /health before its background worker registration is done: wait for a generation.
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    r = httpx.post(
                        url + "/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}, timeout=5
                    )
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "router did not route a request within 60s"
                time.sleep(0.3)
            yield url, engines
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    for e in engines:
        e.shutdown()


@pytest.mark.slow
def test_generate_through_sglang_router_reaches_both_engines(router: tuple[str, list[Engine]]) -> None:
    """Guards against the built-in engine not working as an SGLang worker (the router's health checks,
    worker registration, /generate and SSE forwarding, error pass-through)."""
    url, engines = router
    before = [e.scheduler.num_generated for e in engines]
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "return_logprob": True}
    outs = [httpx.post(url + "/generate", json=body, timeout=30) for _ in range(4)]
    assert all(r.status_code == 200 for r in outs)
    first = outs[0].json()
    assert all(r.json()["output_ids"] == first["output_ids"] for r in outs)
    assert len(first["meta_info"]["output_token_logprobs"]) == 4
    assert all(e.scheduler.num_generated - b >= 4 for e, b in zip(engines, before, strict=True))
    stream = httpx.post(url + "/generate", json={**body, "stream": True}, timeout=30)
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    bad = httpx.post(url + "/generate", json={"input_ids": [], "sampling_params": {}}, timeout=30)
    assert bad.status_code == 400 and "empty" in bad.text
