"""The built-in engine's control calls under deadlines, and its waiting-queue bound, through a real HTTP server.

A control call either completes or leaves the engine as it was, and the weight version always names the weights
served: each check reads the version and then generates, and the tokens and logprobs must be those of the model the
version names (an independent HF forward of each model).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer
from rollout_server.models import init_tiny_model

PROMPT = [11, 42, 7, 300, 5, 9]
NUM_NEW = 6
# Big enough that reading and copying it takes milliseconds (about 80 MB), the scale of a deadline in these tests.
LARGE = {"hidden_size": 512, "num_layers": 6, "vocab_size": 4096}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two models of one architecture; the version names which one the engine serves ("default": a, "7": b)."""
    root = tmp_path_factory.mktemp("engine-control")
    return {"default": init_tiny_model(root / "a", seed=0, **LARGE), "7": init_tiny_model(root / "b", seed=1, **LARGE)}


@pytest.fixture(scope="module")
def references(models: dict[str, Path]) -> dict[str, tuple[list[int], list[float]]]:
    """Greedy tokens of each model and their logprobs, from an HF forward (the engine's convention: T = 1)."""
    refs = {}
    for version, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            ids = model.generate(
                torch.tensor([PROMPT]), max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, do_sample=False, pad_token_id=0
            )[0]
            logits = model(ids.unsqueeze(0)).logits[0, len(PROMPT) - 1 : -1].float()
        new = ids[len(PROMPT) :]
        logprobs = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        refs[version] = (new.tolist(), logprobs.tolist())
    assert refs["default"][0] != refs["7"][0], "the two models must generate differently"
    return refs


@pytest.fixture
def served(models: dict[str, Path]) -> Iterator[tuple[Engine, str]]:
    engine = Engine(
        EngineConfig(model_path=str(models["default"]), max_running_requests=2, context_length=64, num_threads=1)
    )
    engine.start()
    with BackgroundServer(build_app(engine)) as server:
        yield engine, server.url
    engine.shutdown()


def _serving(url: str, refs: dict[str, tuple[list[int], list[float]]]) -> str:
    """The version the engine reports, after checking that it generates exactly as the model of that version."""
    version = httpx.get(f"{url}/get_model_info", timeout=30).json()["weight_version"]
    params = {"max_new_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}
    body = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": params}
    out = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert out["meta_info"]["weight_version"] == version
    ids, logprobs = refs[version]
    assert out["output_ids"] == ids, f"version {version!r} but the tokens are not its model's (a mix)"
    got = [t[0] for t in out["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(logprobs, abs=1e-4), f"version {version!r} but the logprobs are not its model's"
    return str(version)


def _load(url: str, path: Path, version: str) -> httpx.Response:
    body = {"model_path": str(path), "weight_version": version, "abort_all_requests": False}
    return httpx.post(f"{url}/update_weights_from_disk", json=body, timeout=120)


def test_disk_load_slower_than_the_control_timeout_completes_or_changes_nothing(
    served: tuple[Engine, str], models: dict[str, Path], references: dict[str, tuple[list[int], list[float]]]
) -> None:
    """Guards against issue 19 defect 6: a weight load that outlasts `control_timeout_s` answered 500 while the
    scheduler thread finished it, so the engine served the new weights under the old version (and the disk
    backend resumed it so). Every answer must match the engine after it: success with the new version and the new
    model's tokens and logprobs, or a failure with the old version and the old model's."""
    engine, url = served
    assert _serving(url, references) == "default"
    engine.config.control_timeout_s = 0.002  # the load (read + copy of ~80 MB) takes longer than this
    for version in ("7", "default", "7", "default"):
        before = _serving(url, references)
        r = _load(url, models[version], version)
        now = _serving(url, references)
        assert r.status_code in (200, 503), r.text  # a failure is a refusal that changed nothing, never a 500
        if r.status_code == 200:
            assert r.json()["success"] and now == version, r.text
        else:
            assert not r.json()["success"] and now == before, r.text
            assert "--control_timeout_s" in r.json()["message"] and "unchanged" in r.json()["message"]
    engine.config.control_timeout_s = 30.0
    assert _load(url, models["7"], "7").status_code == 200
    assert _serving(url, references) == "7"


def test_disk_load_past_its_deadline_is_discarded_before_the_swap(
    served: tuple[Engine, str], models: dict[str, Path], references: dict[str, tuple[list[int], list[float]]]
) -> None:
    """Guards against a weight load that runs past its deadline (`weight_update_timeout_s`) changing the engine
    after its caller was told it failed: the staged weights are dropped before the swap."""
    engine, url = served
    engine.config.weight_update_timeout_s = 0.001
    r = _load(url, models["7"], "7")
    assert r.status_code == 400 and not r.json()["success"], r.text
    assert "--weight_update_timeout_s" in r.json()["message"]
    assert _serving(url, references) == "default"
    engine.config.weight_update_timeout_s = 600.0
    assert _load(url, models["7"], "7").status_code == 200 and _serving(url, references) == "7"


def test_control_call_queued_behind_a_busy_scheduler_is_withdrawn(
    served: tuple[Engine, str], models: dict[str, Path], references: dict[str, tuple[list[int], list[float]]]
) -> None:
    """Guards against a control call that timed out waiting for the scheduler thread (busy with a long step)
    running later anyway: it is withdrawn, answers 503 naming `--control_timeout_s`, and never runs."""
    engine, url = served
    engine.config.control_timeout_s = 0.3
    busy = engine.scheduler.call(lambda: time.sleep(2.0))  # a step that outlasts the deadline
    r = _load(url, models["7"], "7")
    v = httpx.post(f"{url}/update_weight_version", json={"new_version": "9", "abort_all_requests": True}, timeout=30)
    busy.result(timeout=10)
    for answer in (r, v):
        assert answer.status_code == 503 and not answer.json()["success"], answer.text
        assert "--control_timeout_s" in answer.json()["message"]
    time.sleep(0.2)
    assert _serving(url, references) == "default"  # neither the load nor the version ran after the deadline


@pytest.fixture
def queued_engine(tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    engine = Engine(
        EngineConfig(
            model_path=str(init_tiny_model(tmp_path / "tiny")),
            max_running_requests=2,
            context_length=64,
            max_queued_requests=3,
            overload_retry_after_s=2,
        )
    )
    engine.start()
    with BackgroundServer(build_app(engine)) as server:
        yield engine, server.url
    engine.shutdown()


def test_generate_beyond_the_waiting_queue_bound_gets_503_with_retry_after(
    queued_engine: tuple[Engine, str],
) -> None:
    """Guards against an unbounded waiting queue (memory grows with every request while the engine is paused or
    slow): beyond `max_queued_requests` waiting requests, /generate answers 503 with Retry-After, as SGLang's
    `--max-queued-requests` does, and the queued requests still complete."""
    engine, url = queued_engine
    body: dict[str, Any] = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    assert httpx.post(f"{url}/pause_generation", json={"mode": "in_place"}, timeout=30).status_code == 200

    results: list[httpx.Response] = []

    async def fill() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            results.extend(await asyncio.gather(*(c.post(f"{url}/generate", json=body) for _ in range(3))))

    filler = threading.Thread(target=asyncio.run, args=(fill(),))
    filler.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/get_load", timeout=10).json()[0]["num_waiting_reqs"] < 3:
        assert time.monotonic() < deadline, "the three requests never queued"
        time.sleep(0.02)
    full = httpx.post(f"{url}/generate", json=body, timeout=30)
    stream = httpx.post(f"{url}/generate", json={**body, "stream": True}, timeout=30)
    n2 = httpx.post(f"{url}/generate", json={**body, "sampling_params": {"n": 2, "max_new_tokens": 1}}, timeout=30)
    for r in (full, stream, n2):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "2" and "queue is full" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/continue_generation", json={}, timeout=30).status_code == 200
    filler.join(timeout=60)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert httpx.post(f"{url}/generate", json=body, timeout=30).status_code == 200  # room again


def test_a_rollout_sample_waits_out_a_full_queue_without_tripping_the_breaker(
    queued_engine: tuple[Engine, str],
) -> None:
    """Guards against the rollout worker treating back-pressure as a failure: a 503 with Retry-After from a full
    waiting queue counted toward the circuit breaker (a busy engine was taken out of rotation) and toward the
    sample's attempts (it failed after 3), instead of waiting as asked and trying again."""
    from common.config import load_config
    from rollout_server.worker.client import EngineOverloaded
    from rollout_server.worker.config import RolloutConfig
    from rollout_server.worker.generation import GroupPlan, SampleGenerator
    from rollout_server.worker.metrics import RolloutMetrics
    from rollout_server.worker.processors import get_processor
    from rollout_server.worker.router import BuiltinRouter

    engine, url = queued_engine
    body: dict[str, Any] = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    assert httpx.post(f"{url}/pause_generation", json={"mode": "in_place"}, timeout=30).status_code == 200

    def post() -> None:
        httpx.post(f"{url}/generate", json=body, timeout=60)

    fillers = [threading.Thread(target=post, daemon=True) for _ in range(3)]
    for f in fillers:
        f.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/get_load", timeout=10).json()[0]["num_waiting_reqs"] < 3:
        assert time.monotonic() < deadline, "the three requests never queued"
        time.sleep(0.02)
    threading.Timer(3.0, lambda: httpx.post(f"{url}/continue_generation", json={}, timeout=30)).start()

    cfg = load_config(RolloutConfig, overrides=["--engines.use_registry", "false", "--engines.urls", f'["{url}"]',
                                                "--retry.max_attempts", "1"])  # fmt: skip
    metrics = RolloutMetrics()

    async def main() -> tuple[Any, int, int, bool]:
        router = BuiltinRouter(cfg, None)
        generator = SampleGenerator(cfg, router, get_processor("qwen3"), metrics)
        async with router.lease() as leased:
            with pytest.raises(EngineOverloaded) as overloaded:
                await leased.client.generate([1, 2, 3], {"max_new_tokens": 2}, "probe")
        assert overloaded.value.retry_after_s == 2.0
        plan = GroupPlan([1, 2, 3], 2, {"temperature": 0}, 1)
        sample = await asyncio.wait_for(generator.generate_sample(plan, "g-0"), timeout=60)
        [state] = router._engines.values()
        closed = state.open_until is None
        await router.close()
        return sample, state.consecutive_failures, state.num_failures, closed

    sample, consecutive, failures, closed = asyncio.run(main())
    assert sample.finish_reason == "length" and len(sample.response_ids) == 2 * 4  # two int32 tokens
    assert (consecutive, failures, closed) == (0, 0, True)
    assert metrics.retries.labels(reason="overloaded")._value.get() >= 1
    for f in fillers:
        f.join(timeout=60)


def test_request_bodies_in_flight_are_bounded_with_503_and_retry_after(tmp_path: Path) -> None:
    """Guards against memory growing with the bodies held by waiting generations (each is held until its answer):
    past `max_concurrent_body_mb` the engine answers 503 with Retry-After, which the rollout worker treats as
    back-pressure; the held request still completes and the engine takes bodies again afterwards."""
    engine = Engine(EngineConfig(model_path=str(init_tiny_model(tmp_path / "tiny")), context_length=4096,
                                 max_concurrent_body_mb=0.004, overload_retry_after_s=3))  # fmt: skip
    engine.start()
    body: dict[str, Any] = {"input_ids": [1, 2, 3] * 400, "sampling_params": {"max_new_tokens": 2}}  # ~4.8 KB
    try:
        with BackgroundServer(build_app(engine)) as server:
            url = server.url
            assert httpx.post(f"{url}/pause_generation", json={"mode": "in_place"}, timeout=30).status_code == 200
            held: list[httpx.Response] = []
            first = threading.Thread(target=lambda: held.append(httpx.post(f"{url}/generate", json=body, timeout=60)))
            first.start()
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/get_load", timeout=10).json()[0]["num_waiting_reqs"] < 1:
                assert time.monotonic() < deadline, "the first request never queued"
                time.sleep(0.02)
            busy = httpx.post(f"{url}/generate", json=body, timeout=30)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "3", busy.text
            assert "--max_concurrent_body_mb" in busy.json()["message"]
            assert httpx.post(f"{url}/continue_generation", json={}, timeout=30).status_code == 200
            first.join(timeout=60)
            assert [r.status_code for r in held] == [200]
            assert httpx.post(f"{url}/generate", json=body, timeout=30).status_code == 200  # room again
    finally:
        engine.shutdown()
