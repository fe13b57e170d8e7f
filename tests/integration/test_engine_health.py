"""/health during a weight push (issue 21, breaker 1), on built-in engines over real HTTP.

SGLang's /health is a one-token generation unless SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION is off, so a paused
engine answers it 503 after its health timeout; the built-in engine does the same. Our liveness probes (the
learner's `Fleet.healthy`, the rollout worker's client, router and `_wait_generating`) must still see a paused
engine alive, and every launcher starts engines with the variable off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from broker.schemas import Sample
from common.net import free_port
from rollout_server.engine.api import build_app
from rollout_server.engine.config import HEALTH_GENERATION_ENV, EngineConfig, health_endpoint_generation
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer
from rollout_server.models import init_tiny_model

HEALTH_TIMEOUT_S = 3.0  # the engine's health_timeout_s: how long a paused engine holds /health before its 503


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny_model(tmp_path_factory.mktemp("health") / "m", seed=0)


@pytest.fixture(scope="module")
def engine(model: Path) -> Iterator[Engine]:
    eng = Engine(
        EngineConfig(
            model_path=str(model), max_running_requests=4, context_length=256, health_timeout_s=HEALTH_TIMEOUT_S
        )
    )
    eng.start()
    yield eng
    eng.shutdown()


@contextmanager
def serve(engine: Engine, monkeypatch: pytest.MonkeyPatch, generation: str | None) -> Iterator[str]:
    """The engine's app served with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION as given (None: unset)."""
    if generation is None:
        monkeypatch.delenv(HEALTH_GENERATION_ENV, raising=False)
    else:
        monkeypatch.setenv(HEALTH_GENERATION_ENV, generation)
    with BackgroundServer(build_app(engine)) as server:
        yield server.url


@contextmanager
def paused(url: str, mode: str = "abort") -> Iterator[None]:
    assert httpx.post(f"{url}/pause_generation", json={"mode": mode}, timeout=30).status_code == 200
    try:
        yield
    finally:
        assert httpx.post(f"{url}/continue_generation", json={}, timeout=30).status_code == 200


def timed_get(url: str, timeout_s: float = HEALTH_TIMEOUT_S + 10) -> tuple[int, float]:
    t0 = time.monotonic()
    status = httpx.get(url, timeout=timeout_s).status_code
    return status, time.monotonic() - t0


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused, as for a dead engine


def test_generating_health_fails_on_a_paused_engine_after_its_timeout_and_passes_once_resumed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the built-in engine's /health differing from SGLang's: with the variable unset (SGLang's
    default, on) /health is the generation probe, so a paused engine must not answer 200 (it answers 503 once
    health_timeout_s passes, as SGLang's HEALTH_CHECK_TIMEOUT), answers 200 when it resumes within the timeout, and
    answers at once when idle; /health_generate behaves alike. An engine whose /health answered 200 while paused
    would let tests pass that real SGLang fails."""
    with serve(engine, monkeypatch, None) as url:
        assert timed_get(f"{url}/health")[0] == 200
        with paused(url):
            for path in ("/health", "/health_generate"):
                status, elapsed = timed_get(url + path)
                assert status == 503, path
                assert HEALTH_TIMEOUT_S - 0.2 <= elapsed < HEALTH_TIMEOUT_S + 5, (path, elapsed)
            load = httpx.get(f"{url}/get_load", timeout=10).json()[0]
            assert load["num_reqs"] == 0, load  # a probe given up on leaves nothing queued
        with paused(url):
            answer: list[tuple[int, float]] = []
            probe = threading.Thread(target=lambda: answer.append(timed_get(f"{url}/health")))
            probe.start()
            time.sleep(0.8)
            assert probe.is_alive(), "/health answered while the engine was paused"
        probe.join(timeout=HEALTH_TIMEOUT_S + 10)
        [(status, elapsed)] = answer
        assert status == 200 and elapsed < HEALTH_TIMEOUT_S, (status, elapsed)


def test_health_without_generation_answers_a_paused_engine_at_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the variable being ignored: with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 (how every
    launcher starts engines, as slime does) /health is a liveness answer, 200 while paused, and /health_generate
    stays the generation probe that a paused engine fails."""
    with serve(engine, monkeypatch, "0") as url, paused(url):
        status, elapsed = timed_get(f"{url}/health")
        assert status == 200 and elapsed < 1.0, (status, elapsed)
        assert timed_get(f"{url}/health_generate")[0] == 503


def test_the_variable_is_read_as_sglang_reads_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards against a value SGLang takes as off (False, no, N) leaving our /health generating, and against a
    malformed value being silently taken: SGLang warns and keeps the default (on), naming the variable."""
    for value, expected in [("0", False), ("False", False), ("no", False), ("N", False), ("1", True), ("YES", True)]:
        monkeypatch.setenv(HEALTH_GENERATION_ENV, value)
        assert health_endpoint_generation() is expected, value
    monkeypatch.setenv(HEALTH_GENERATION_ENV, "off")
    with caplog.at_level(logging.WARNING):
        assert health_endpoint_generation() is True
    assert HEALTH_GENERATION_ENV in caplog.text and "'off'" in caplog.text


def test_liveness_probes_see_a_paused_engine_alive_where_the_old_health_probe_saw_it_dead(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against issue 21's bug: the learner's Fleet.healthy (after a failed bucket) and the rollout worker's
    probes asked /health, which a paused SGLang engine (variable on) fails, so every engine paused for a push was
    labelled dead and the router's breaker took every engine out. The old probe is shown failing here; the new
    ones report the paused engine alive, and still report a dead one dead."""
    from learner.weight_sync.config import DistributedSyncConfig
    from learner.weight_sync.fleet import Fleet, control_client
    from rollout_server.worker.client import EngineClient, make_http_client

    gone = dead_url()
    with serve(engine, monkeypatch, "1") as url, paused(url):
        old_probe = timed_get(f"{url}/health")[0] == 200  # what both clients asked before
        assert not old_probe

        cfg = DistributedSyncConfig(engine_urls=[url, gone], use_registry=False, http_timeout_s=5)
        client = control_client(cfg)
        try:
            t0 = time.monotonic()
            assert Fleet(cfg, client, None).healthy([url, gone]) == {url}
            assert time.monotonic() - t0 < 2.0
        finally:
            client.close()

        async def worker_probes() -> tuple[str, str]:
            async with make_http_client() as http:
                alive = EngineClient(url, http, 60, 5, health_timeout_s=2)
                dead = EngineClient(gone, http, 60, 5, health_timeout_s=2)
                return await alive.health(), await dead.health()

        assert asyncio.run(worker_probes()) == ("ok", "unreachable")


def test_a_push_longer_than_resume_timeout_costs_no_breaker_failure(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the rollout worker counting a paused engine dead: a sample aborted by a pause waits for its
    engine (`_wait_generating`), resubmits and is held until the push ends. Polling the generating /health, it
    gave up after resume_timeout_s and reported the live engine to the breaker (threshold 1 here: out of
    rotation), and the router's periodic probe failed it too. Now neither counts a failure and the sample ends."""
    from common.config import load_config
    from rollout_server.worker.config import RolloutConfig
    from rollout_server.worker.generation import GroupPlan, SampleGenerator
    from rollout_server.worker.metrics import RolloutMetrics
    from rollout_server.worker.processors import get_processor
    from rollout_server.worker.router import BuiltinRouter

    with serve(engine, monkeypatch, "1") as url:
        overrides = ["--engines.use_registry", "false", "--engines.urls", f'["{url}"]', "--resume_timeout_s", "1.0",
                     "--resume_poll_s", "0.05", "--health_timeout_s", "2", "--router.failure_threshold", "1"]  # fmt: skip
        cfg = load_config(RolloutConfig, overrides=overrides)
        metrics = RolloutMetrics()

        async def main() -> tuple[Sample, int, bool]:
            router = BuiltinRouter(cfg, None)
            generator = SampleGenerator(cfg, router, get_processor("qwen3"), metrics)
            plan = GroupPlan([1, 2, 3], 4, {"temperature": 0, "ignore_eos": True}, 1)
            # Held by an in_place pause, then aborted by a pause with abort: the sample's request ends "abort"
            # with no token, exactly as a weight push catches it, and its engine stays paused meanwhile.
            await asyncio.to_thread(httpx.post, f"{url}/pause_generation", json={"mode": "in_place"}, timeout=30)
            sample_task = asyncio.create_task(generator.generate_sample(plan, "push-0"))
            while (await asyncio.to_thread(httpx.get, f"{url}/get_load", timeout=10)).json()[0]["num_reqs"] < 1:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(httpx.post, f"{url}/pause_generation", json={"mode": "abort"}, timeout=30)
            await asyncio.sleep(cfg.resume_timeout_s * 2.5)  # the push outlasts resume_timeout_s
            await router.probe()
            await asyncio.to_thread(httpx.post, f"{url}/continue_generation", json={}, timeout=30)
            sample = await asyncio.wait_for(sample_task, timeout=60)
            [state] = router._engines.values()
            await router.close()
            return sample, state.num_failures, state.open_until is None

        sample, failures, in_rotation = asyncio.run(main())
        assert (failures, in_rotation) == (0, True)
        assert sample.finish_reason == "length" and sample.num_resumes >= 1


def _registered_url(redis_url: str, run_id: str, proc: subprocess.Popen[bytes]) -> str:
    from broker.factory import connect
    from broker.settings import BrokerConfig

    broker = connect(BrokerConfig(redis_url=redis_url, run_id=run_id))
    try:
        deadline = time.monotonic() + 120
        while not (live := broker.engines.live()):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "the engine never registered"
            time.sleep(0.2)
        return live[0].url
    finally:
        broker.close()


def _assert_health_answers_while_paused(url: str) -> None:
    with paused(url):
        try:
            status, elapsed = timed_get(f"{url}/health", timeout_s=5)
        except httpx.ReadTimeout:
            pytest.fail("a paused engine's /health did not answer within 5 s: its launch left generation on")
    assert status == 200 and elapsed < 2.0, f"/health of a paused engine: {status} after {elapsed:.1f}s"


@pytest.mark.slow
def test_launchers_start_engines_with_health_generation_off(
    model: Path, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a launch path leaving SGLang's default on (paused engines failing /health on every push):
    `longtrace engine launch`'s child and `longtrace up`'s engine answer /health while paused, even when the
    launcher's own environment says 1. Their health timeout is 30 s, so a generating /health could not pass."""
    from common.supervisor import Supervisor
    from deploy.launcher import specs
    from deploy.launcher.tomlfile import write_config

    monkeypatch.setenv(HEALTH_GENERATION_ENV, "1")  # inherited by the children unless the launch path overrides it
    engine_args = '["--num_threads", "1", "--health_timeout_s", "30"]'
    cmd = [
        sys.executable, "-m", "rollout_server.launch", "--model_path", str(model), "--port", "0",
        "--engine_id", "h", f"--broker.redis_url={redis_url}", "--broker.run_id=health", "--extra_args", engine_args,
    ]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        _assert_health_answers_while_paused(_registered_url(redis_url, "health", launcher))
    finally:
        launcher.terminate()
        launcher.wait(timeout=60)

    port = free_port()
    config = EngineConfig(model_path=str(model), port=port, num_threads=1, health_timeout_s=30, context_length=256)
    path = write_config(config, tmp_path / "engine.toml")
    url = f"http://127.0.0.1:{port}"
    sup = Supervisor(tmp_path / "logs")
    child = sup.start(specs.engine("engine-0", str(path), url, {}, ready_timeout_s=120))
    try:
        _assert_health_answers_while_paused(url)
    finally:
        sup.stop(child)
