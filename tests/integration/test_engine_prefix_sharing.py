"""Prefix sharing end to end: built-in engines (two with sharing, one with `enable_prefix_sharing` off) on a tiny
model, served over real HTTP, and the rollout worker's router sending a group's samples to one of them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.schemas import RewardInfo, Task, pack_ids
from common.config import load_config
from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer
from rollout_server.models import init_tiny_model
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.generation import SampleGenerator
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.processors import get_processor
from rollout_server.worker.router import BuiltinRouter

P = 120  # prompt tokens
N = 8  # samples per group
PROMPT = [random.Random(1).randrange(8, 400) for _ in range(P)]


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Engines "a" and "b" share prefixes, "off" does not; same weights."""
    model = init_tiny_model(tmp_path_factory.mktemp("prefix") / "m", seed=0)
    engines = {
        name: Engine(
            EngineConfig(
                model_path=str(model), max_running_requests=N, context_length=256, enable_prefix_sharing=name != "off"
            )
        )
        for name in ("a", "b", "off")
    }
    for e in engines.values():
        e.start()
    try:
        with (
            BackgroundServer(build_app(engines["a"])) as a,
            BackgroundServer(build_app(engines["b"])) as b,
            BackgroundServer(build_app(engines["off"])) as off,
        ):
            yield {"a": a.url, "b": b.url, "off": off.url}
    finally:
        for e in engines.values():
            e.shutdown()


def _counters(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=10, trust_env=False)
    r.raise_for_status()
    return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}


def _generate(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = httpx.post(url + "/generate", json=body, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    out = r.json()
    return out if isinstance(out, list) else [out]


def _moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


PREFILL, CACHED, PROMPT_TOTAL = (
    "longtrace_engine_prefill_tokens_total",
    "sglang:cached_tokens_total",
    "sglang:prompt_tokens_total",
)


@pytest.mark.parametrize("engine", ["a", "off"])
def test_a_group_computes_its_prompt_once_and_samples_independently(urls: dict[str, str], engine: str) -> None:
    """Guards against the n samples of one prompt each prefilling it (n x the prefill work; what the engine did
    before prefix sharing, and still does with it off), against cached_tokens not reported per request or missing
    from `sglang:cached_tokens_total`, and against shared samples sharing more than K/V (identical outputs)."""
    before = _counters(urls[engine])
    body = {"input_ids": [PROMPT] * N, "sampling_params": {"max_new_tokens": 16, "temperature": 1.0}}
    outs = _generate(urls[engine], body)
    after = _counters(urls[engine])
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert all(o["meta_info"]["prompt_tokens"] == P for o in outs)
    assert _moved(before, after, PROMPT_TOTAL) == N * P
    if engine == "off":
        assert cached == [0] * N and _moved(before, after, PREFILL) == N * P
        return
    assert cached == [0] + [P - 1] * (N - 1)  # the first computes the prompt, the others only its last token
    assert _moved(before, after, PREFILL) == P + N - 1
    assert _moved(before, after, CACHED) == (N - 1) * (P - 1)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_greedy_outputs_and_logprobs_are_the_same_with_and_without_sharing(urls: dict[str, str]) -> None:
    """Guards against copied K/V that differ from computed ones (wrong slot, positions, layers, or K/V of a
    different prefix), visible as other greedy tokens or logprobs than an engine that prefills everything: copies of
    one prompt, a prompt extending it (shares only its prefix), and one asking for prompt logprobs (not shared)."""
    longer = PROMPT + [9, 10, 11]
    body = {
        "input_ids": [PROMPT, PROMPT, longer, PROMPT],
        "sampling_params": {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": -1,
    }
    shared, plain = _generate(urls["a"], body), _generate(urls["off"], body)
    assert [o["meta_info"]["cached_tokens"] for o in shared] == [0, P - 1, P, P - 1]
    for s, p in zip(shared, plain, strict=True):
        assert s["output_ids"] == p["output_ids"]
        lp_s = [t[0] for t in s["meta_info"]["output_token_logprobs"]]
        lp_p = [t[0] for t in p["meta_info"]["output_token_logprobs"]]
        assert lp_s == pytest.approx(lp_p, abs=1e-5)
    with_prompt = {**body, "input_ids": [PROMPT, PROMPT], "logprob_start_len": 0}
    shared, plain = _generate(urls["a"], with_prompt), _generate(urls["off"], with_prompt)
    assert [o["meta_info"]["cached_tokens"] for o in shared] == [0, 0]
    for s, p in zip(shared, plain, strict=True):
        assert s["output_ids"] == p["output_ids"]
        lp_s = [t[0] for t in s["meta_info"]["input_token_logprobs"][1:]]
        lp_p = [t[0] for t in p["meta_info"]["input_token_logprobs"][1:]]
        assert lp_s == pytest.approx(lp_p, abs=1e-5)


def test_the_worker_sends_a_groups_samples_to_one_engine(urls: dict[str, str]) -> None:
    """Guards against the worker's router spreading a group's samples over engines by load (each engine that gets
    one prefills the whole prompt again): with two engines up, one group lands on one engine, whose prefill work is
    about one prompt (as the worker's prompt/cached token counters also tell), and two groups at once use both
    engines."""
    cfg = load_config(
        RolloutConfig,
        overrides=[
            "--engines.use_registry=false",
            f'--engines.urls=["{urls["a"]}", "{urls["b"]}"]',
            f"--sampling.num_samples={N}",
            "--sampling.max_response_len=48",
            "--sampling.stop_token_ids=[]",
            "--sampling.ignore_eos=true",
        ],
    )

    def task(i: int) -> Task:
        prompt = [random.Random(10 + i).randrange(8, 400) for _ in range(P)]
        return Task(
            run_id="prefix", group_id=f"g{i}", dataset_index=i, prompt_ids=pack_ids(prompt), label="",
            reward_info=RewardInfo(question=""), num_samples=N, policy_version=0,
        )  # fmt: skip

    async def main() -> None:
        router = BuiltinRouter(cfg, None)
        await router.start()
        metrics = RolloutMetrics()
        gen = SampleGenerator(cfg, router, get_processor(cfg.processor), metrics)
        try:
            before = {k: _counters(u)[PREFILL] for k, u in urls.items()}
            group = await gen.generate_group(task(0))
            moved = {k: _counters(u)[PREFILL] - before[k] for k, u in urls.items()}
            [engine] = {s.engine_id for s in group.samples}
            name = "a" if engine == urls["a"] else "b"
            assert len(group.samples) == N
            assert 0 < moved[name] < 2 * P and moved["a" if name == "b" else "b"] == 0, moved
            reported = {
                k: metrics.registry.get_sample_value(f"longtrace_rollout_{k}_tokens_total") or 0.0
                for k in ("prompt", "cached")
            }
            assert reported["prompt"] == N * P  # and what the bench reads matches the engine's own count:
            assert reported["prompt"] - reported["cached"] == moved[name], (reported, moved)
            groups = await asyncio.gather(gen.generate_group(task(1)), gen.generate_group(task(2)))
            per_group = [{s.engine_id for s in g.samples} for g in groups]
            assert all(len(e) == 1 for e in per_group) and per_group[0] != per_group[1], per_group
        finally:
            await router.close()

    asyncio.run(main())
