"""The built-in engine's GET /metrics (rollout_server/engine/metrics.py) on a real uvicorn server over a real engine
thread and a tiny model: SGLang's metric names, and counts that move with the requests served."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer
from rollout_server.models import init_tiny_model

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SGLANG_NAMES = {
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:num_used_tokens",
    "sglang:token_usage",
    "sglang:max_total_num_tokens",
    "sglang:gen_throughput",
    "sglang:prompt_tokens_total",
    "sglang:generation_tokens_total",
    "sglang:num_requests_total",
    "sglang:e2e_request_latency_seconds_count",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model = init_tiny_model(tmp_path_factory.mktemp("engine-metrics") / "m", seed=0)
    eng = Engine(EngineConfig(model_path=str(model), max_running_requests=4, context_length=256))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with BackgroundServer(build_app(engine)) as server:
        yield server.url


def scrape(url: str) -> Samples:
    r = httpx.get(f"{url}/metrics", timeout=10, trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def one(samples: Samples, metric: str, **labels: str) -> float:
    [v] = [v for (n, lab), v in samples.items() if n == metric and set(labels.items()) <= set(lab)]
    return v


def test_generate_moves_sglangs_counters(url: str, engine: Engine) -> None:
    """Guards against a /metrics that a dashboard built for SGLang cannot read (other names, no `model_name` label)
    and against counters that do not count what was served: one /generate of a 5-token prompt for 6 new tokens must
    add 5 prompt tokens, 6 generation tokens, one request and one latency observation."""
    before = scrape(url)
    names = {n for n, _ in before}
    assert names >= SGLANG_NAMES, SGLANG_NAMES - names
    assert one(before, "sglang:num_running_reqs", model_name=engine.served_model_name) == 0
    assert one(before, "sglang:max_total_num_tokens") == 4 * 256
    body = {
        "input_ids": [1, 2, 3, 4, 5],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    }
    r = httpx.post(f"{url}/generate", json=body, timeout=60, trust_env=False)
    assert r.status_code == 200, r.text
    after = scrape(url)
    for metric, moved in (
        ("sglang:prompt_tokens_total", 5),
        ("sglang:generation_tokens_total", 6),
        ("sglang:num_requests_total", 1),
        ("sglang:e2e_request_latency_seconds_count", 1),
    ):
        assert one(after, metric) - one(before, metric) == moved, metric
    assert one(after, "sglang:e2e_request_latency_seconds_sum") > one(before, "sglang:e2e_request_latency_seconds_sum")
    assert one(after, "sglang:num_queue_reqs") == 0 and one(after, "sglang:token_usage") == 0


def test_weight_version_and_updates_are_longtrace_metrics(url: str, engine: Engine) -> None:
    """Guards against the dashboard missing what SGLang has no metric for: the policy version an engine serves must
    follow /update_weight_version, and each weight-update call must be counted by op and outcome (a refused one as
    failed), so a stuck or failing engine shows up beside the learner's pushes."""
    before = scrape(url)
    ok = httpx.post(f"{url}/update_weight_version", json={"new_version": "7"}, timeout=30, trust_env=False)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(
        f"{url}/update_weights_from_disk", json={"model_path": "/nonexistent"}, timeout=30, trust_env=False
    )
    assert bad.status_code == 400, bad.text
    after = scrape(url)
    assert one(after, "longtrace_engine_weight_version") == 7
    assert one(after, "longtrace_engine_paused") == 0
    ok_key = ("longtrace_engine_weight_updates_total", (("op", "version"), ("outcome", "ok")))
    failed_key = ("longtrace_engine_weight_updates_total", (("op", "disk"), ("outcome", "failed")))
    assert after[ok_key] - before.get(ok_key, 0) == 1
    assert after[failed_key] - before.get(failed_key, 0) == 1
    assert one(after, "longtrace_engine_weight_update_seconds_count", op="version") >= 1


def test_a_second_app_on_the_same_engine_does_not_count_twice(url: str, engine: Engine) -> None:
    """Guards against double counting when an engine gets a second app (tests and benches build one per client):
    the request counters are installed on the engine once."""
    build_app(engine)
    before = scrape(url)
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}}
    assert httpx.post(f"{url}/generate", json=body, timeout=60, trust_env=False).status_code == 200
    after = scrape(url)
    assert one(after, "sglang:num_requests_total") - one(before, "sglang:num_requests_total") == 1
    assert one(after, "sglang:generation_tokens_total") - one(before, "sglang:generation_tokens_total") == 2
