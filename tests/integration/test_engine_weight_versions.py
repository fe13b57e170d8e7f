"""Per-token weight versions across a weight update, through a real built-in engine over HTTP.

SGLang 0.5.23 reports, on every final /generate output, `meta_info.weight_versions`: {version, start, end} per run
of output tokens generated under one weight version (srt/utils/weight_versions.py), so an answer paused in_place or
retract across an update names each span's version. The engine must report them so and the rollout worker must
label each token with its span's policy version: the learner's staleness and icepop read those labels. Every
boundary is checked against the weights themselves: the logprobs of a span are those of the model its version
names (an independent HF forward of each model).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pydantic import ValidationError
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import AutoModelForCausalLM

from broker.schemas import WeightSegment
from learner.weight_sync.config import DiskSyncConfig, DistributedSyncConfig
from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer
from rollout_server.models import init_tiny_model
from rollout_server.worker.client import EngineClient as WorkerClient
from rollout_server.worker.client import EngineError, make_http_client, parse_generate
from weights.engine_client import EngineClient as ControlClient

PROMPT = [11, 42, 7, 300, 5, 9]
NUM_NEW = 300  # long enough to still be generating through two pause cycles
ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two models of one architecture (other seeds): the weights a version names ("a" at start, then "b")."""
    root = tmp_path_factory.mktemp("weight-versions")
    return {"a": init_tiny_model(root / "a", seed=0), "b": init_tiny_model(root / "b", seed=1)}


@pytest.fixture
def served(models: dict[str, Path]) -> Iterator[tuple[Engine, str]]:
    engine = Engine(
        EngineConfig(model_path=str(models["a"]), max_running_requests=2, context_length=512, num_threads=1)
    )
    engine.start()
    try:
        with BackgroundServer(build_app(engine)) as server:
            yield engine, server.url
    finally:
        engine.shutdown()


_HF: dict[Path, Any] = {}


def _hf_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    """log_softmax(logits)[token] of each token after PROMPT, one full forward (the engine's convention, T = 1)."""
    if model_dir not in _HF:
        _HF[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = _HF[model_dir](torch.tensor([PROMPT + ids])).logits[0, len(PROMPT) - 1 : -1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
    return [float(x) for x in lp]


def _post(url: str, path: str, body: dict[str, Any]) -> None:
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"


def _generated(engine: Engine, more: int, timeout_s: float = 60) -> None:
    """Wait until the engine has sampled `more` tokens past now (the generation under test is the only one)."""
    start, deadline = engine.scheduler.num_generated, time.monotonic() + timeout_s
    while engine.scheduler.num_generated < start + more:
        assert time.monotonic() < deadline, "the engine generated nothing"
        time.sleep(0.002)


def _greedy_body(max_new: int = NUM_NEW, **extra: Any) -> dict[str, Any]:
    params = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    return {"input_ids": PROMPT, "return_logprob": True, "sampling_params": params, **extra}


def _two_updates(url: str, engine: Engine, models: dict[str, Path], mode: str) -> None:
    """While one request generates: pause(mode) -> model b as "1" -> continue; then pause(mode) -> model a without a
    version -> versions "2" then "3" (no token between: "2" names nothing) -> continue."""
    _generated(engine, 5)
    _post(url, "/pause_generation", {"mode": mode})
    body = {"model_path": str(models["b"]), "weight_version": "1", "abort_all_requests": False}
    _post(url, "/update_weights_from_disk", body)
    _post(url, "/continue_generation", {})
    _generated(engine, 5)
    _post(url, "/pause_generation", {"mode": mode})
    _post(url, "/update_weights_from_disk", {"model_path": str(models["a"]), "abort_all_requests": False})
    for version in ("2", "3"):
        _post(url, "/update_weight_version", {"new_version": version, "abort_all_requests": False})
    _post(url, "/continue_generation", {})


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_an_answer_paused_across_updates_reports_each_spans_version(
    served: tuple[Engine, str], models: dict[str, Path], mode: str
) -> None:
    """Guards against issue 21 breaker 3: an answer that spans a weight update (pause in_place or retract) reported
    only the last version, labelling the old weights' tokens with the new version. Each span must carry its own
    version with boundaries exact to the token (the logprobs on each side are the named model's), a version set with
    no token under it must name no span, and the worker's parser must turn the spans into the same segments."""
    engine, url = served
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{url}/generate", json=_greedy_body(), timeout=120)
        _two_updates(url, engine, models, mode)
        reply = answer.result(timeout=120)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    meta, ids = out["meta_info"], out["output_ids"]
    spans = meta["weight_versions"]
    assert [s["version"] for s in spans] == ["default", "1", "3"], spans
    n1, n2 = spans[1]["start"], spans[2]["start"]
    assert [(s["start"], s["end"]) for s in spans] == [(0, n1), (n1, n2), (n2, NUM_NEW)]
    assert 0 < n1 < n2 < NUM_NEW == len(ids) and all(type(s[k]) is int for s in spans for k in ("start", "end"))
    assert meta["weight_version"] == "3" and meta["num_retractions"] == (2 if mode == "retract" else 0)
    got = [t[0] for t in meta["output_token_logprobs"]]
    a, b = _hf_logprobs(models["a"], ids), _hf_logprobs(models["b"], ids)
    if mode == "retract":  # the KV is recomputed under the new weights: every token is its span's model's
        assert got == pytest.approx(a[:n1] + b[n1:n2] + a[n2:], abs=ATOL)
    else:  # in_place keeps the old KV: the first span is model a's, the span after it already is not
        assert got[:n1] == pytest.approx(a[:n1], abs=ATOL)
        # One token under model b can land within 1e-3 of a's logprob by chance (seen in CI); the whole span cannot.
        assert max(abs(got[i] - a[i]) for i in range(n1, n2)) > 100 * ATOL
    res = parse_generate(reply.content, initial_policy_version=0)
    assert res.segments == (WeightSegment(0, 0), WeightSegment(n1, 1), WeightSegment(n2, 3))
    assert res.policy_version == 3 and res.output_ids == ids


def test_rollout_worker_segments_across_an_abort_and_a_retract(
    served: tuple[Engine, str], models: dict[str, Path]
) -> None:
    """Guards against the worker mislabelling a sample resumed across updates: after an abort-mode update it
    resubmits (a new answer whose spans start at 0) and a retract-mode update then splits that answer; the sample's
    segments must be offset into the whole response and match the weights (each segment's logprobs are its
    model's)."""
    from common.config import load_config
    from rollout_server.worker.config import RolloutConfig
    from rollout_server.worker.generation import GroupPlan, SampleGenerator
    from rollout_server.worker.metrics import RolloutMetrics
    from rollout_server.worker.processors import get_processor
    from rollout_server.worker.router import BuiltinRouter

    engine, url = served
    cfg = load_config(
        RolloutConfig,
        overrides=["--engines.use_registry", "false", "--engines.urls", f'["{url}"]', "--resume_poll_s", "0.05"],
    )

    def updates() -> None:
        _generated(engine, 5)
        _post(url, "/pause_generation", {"mode": "abort"})
        body = {"model_path": str(models["b"]), "weight_version": "1", "abort_all_requests": False}
        _post(url, "/update_weights_from_disk", body)
        _post(url, "/continue_generation", {})
        _generated(engine, 5)  # tokens of the resubmitted request
        _post(url, "/pause_generation", {"mode": "retract"})
        body = {"model_path": str(models["a"]), "weight_version": "2", "abort_all_requests": False}
        _post(url, "/update_weights_from_disk", body)
        _post(url, "/continue_generation", {})

    async def main() -> Any:
        router = BuiltinRouter(cfg, None)
        generator = SampleGenerator(cfg, router, get_processor("qwen3"), RolloutMetrics())
        plan = GroupPlan(PROMPT, NUM_NEW, {"temperature": 0, "ignore_eos": True}, 1)
        try:
            sample, _ = await asyncio.wait_for(
                asyncio.gather(generator.generate_sample(plan, "g-0"), asyncio.to_thread(updates)), timeout=120
            )
        finally:
            await router.close()
        return sample

    sample = asyncio.run(main())
    ids, got = sample.response_ids_np().tolist(), sample.logprobs_np().tolist()
    assert len(ids) == NUM_NEW and sample.num_resumes == 1
    [s0, s1, s2] = sample.weight_segments
    assert (s0, s1.policy_version, s2.policy_version) == (WeightSegment(0, 0), 1, 2)
    n1, n2 = s1.start, s2.start
    assert 0 < n1 < n2 < NUM_NEW
    a, b = _hf_logprobs(models["a"], ids), _hf_logprobs(models["b"], ids)
    assert got == pytest.approx(a[:n1] + b[n1:n2] + a[n2:], abs=ATOL)


def _reply(num_tokens: int, version: str = "4", spans: Any = None) -> bytes:
    meta: dict[str, Any] = {
        "finish_reason": {"type": "length", "length": num_tokens},
        "output_token_logprobs": [[-1.0, 7, None] for _ in range(num_tokens)],
        "weight_version": version,
    }
    if spans is not None:
        meta["weight_versions"] = [{"version": v, "start": s, "end": e} for v, s, e in spans]
    return json.dumps({"text": "", "output_ids": [7] * num_tokens, "meta_info": meta}).encode()


def test_parser_reads_spans_and_keeps_the_old_behaviour_without_them() -> None:
    """Guards against the parser needing the new key (an engine before SGLang 0.5.23 sends none: every token is
    `weight_version`'s, an empty answer has no segment), splitting one policy version named twice ("default" and
    "0") into two segments, and accepting spans that do not tile the tokens (a gap, an overlap, a short end)."""
    assert parse_generate(_reply(3), 0).segments == (WeightSegment(0, 4),)
    assert parse_generate(_reply(0), 0).segments == ()
    assert parse_generate(_reply(0, spans=[("4", 0, 0)]), 0).segments == ()
    spans = [("default", 0, 2), ("0", 2, 3), ("5", 3, 6)]
    assert parse_generate(_reply(6, "5", spans), 0).segments == (WeightSegment(0, 0), WeightSegment(3, 5))
    for bad in ([("1", 0, 2), ("2", 3, 6)], [("1", 0, 4), ("2", 3, 6)], [("1", 0, 2), ("2", 2, 5)], []):
        with pytest.raises(EngineError, match="do not tile"):
            parse_generate(_reply(6, "2", bad), 0)
    with pytest.raises(EngineError, match="'v2' is not a policy version"):
        parse_generate(_reply(2, "2", [("v2", 0, 2)]), 0)


def test_meta_info_has_sglangs_keys_and_types(served: tuple[Engine, str]) -> None:
    """Guards against meta_info missing keys SGLang 0.5.23 returns or giving them other types: an int
    `output_token_logprobs_length` with logprobs (and only then); `weight_versions` on a final output (not on a
    stream's partial chunks); an abort's finish_reason with `status_code` and `err_type` (null) for a running
    request, and only type and message for a waiting one."""
    engine, url = served
    out = httpx.post(f"{url}/generate", json=_greedy_body(4), timeout=60).json()
    meta = out["meta_info"]
    assert type(meta["output_token_logprobs_length"]) is int and meta["output_token_logprobs_length"] == 4
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 4}]
    plain = httpx.post(
        f"{url}/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}, timeout=60
    )
    assert "output_token_logprobs_length" not in plain.json()["meta_info"]
    stream = httpx.post(f"{url}/generate", json=_greedy_body(3, stream=True), timeout=60)
    chunks = [json.loads(e[len("data: ") :]) for e in stream.text.split("\n\n") if e and e != "data: [DONE]"]
    assert ["weight_versions" in c["meta_info"] for c in chunks] == [False, False, True]
    assert [c["meta_info"]["output_token_logprobs_length"] for c in chunks] == [1, 2, 3]

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{url}/generate", json=_greedy_body(rid="running"), timeout=60)
        _generated(engine, 3)
        _post(url, "/pause_generation", {"mode": "in_place"})
        waiting = pool.submit(httpx.post, f"{url}/generate", json=_greedy_body(rid="waiting"), timeout=60)
        _wait(lambda: engine.scheduler.num_queued == 1)
        _post(url, "/abort_request", {"abort_all": True})
        first, second = running.result(timeout=60).json()["meta_info"], waiting.result(timeout=60).json()["meta_info"]
        _post(url, "/continue_generation", {})
    assert set(first["finish_reason"]) == {"type", "message", "status_code", "err_type"}
    assert first["finish_reason"]["type"] == "abort" and first["finish_reason"]["status_code"] is None
    assert first["finish_reason"]["err_type"] is None
    assert first["weight_versions"] == [{"version": "default", "start": 0, "end": first["completion_tokens"]}]
    assert set(second["finish_reason"]) == {"type", "message"} and second["finish_reason"]["type"] == "abort"
    assert second["weight_versions"] == [{"version": "default", "start": 0, "end": 0}]


def _wait(cond: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class _Paths:
    """ASGI wrapper of the real engine app recording the paths asked, answering 404 on `missing` (another build)."""

    def __init__(self, app: ASGIApp, missing: str = "") -> None:
        self.app, self.missing = app, missing
        self.asked: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.asked.append(scope["path"])
            if scope["path"] == self.missing:
                await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@pytest.mark.parametrize("missing", ["/get_model_info", "/model_info"])
def test_version_clients_read_model_info(served: tuple[Engine, str], missing: str) -> None:
    """Guards against issue 21 breaker 5: the worker's and the learner's version reads used /get_model_info
    (deprecated in SGLang 0.5.23, gone once removed) instead of /model_info; a build without /model_info (older
    SGLang) must still be read through /get_model_info."""
    engine, _ = served
    app = _Paths(build_app(engine), missing)
    with BackgroundServer(app) as server:
        _post(server.url, "/update_weight_version", {"new_version": "6", "abort_all_requests": False})

        async def worker_read() -> int:
            async with make_http_client() as http:
                return await WorkerClient(server.url, http, 30, 5, 5).policy_version()

        assert asyncio.run(worker_read()) == 6
        control = ControlClient(10)
        try:
            assert control.weight_version(server.url) == "6"
        finally:
            control.close()
    reads = [p for p in app.asked if p.endswith("model_info")]
    want = ["/model_info"] * 2 if missing == "/get_model_info" else ["/model_info", "/get_model_info"] * 2
    assert reads == want


def test_disk_sync_refuses_in_place_pause() -> None:
    """Guards against a config SGLang cannot run: the disk backend's load flushes the KV cache, which SGLang 0.5.23
    refuses (the update answers failure) while an in_place pause keeps requests holding it, so every push to a busy
    engine would fail. Refused at load, naming the flag; retract and the distributed backend stay allowed."""
    with pytest.raises(ValidationError, match="--weight_sync.pause_mode in_place"):
        DiskSyncConfig(export_dir="x", pause_mode="in_place")
    assert DiskSyncConfig(export_dir="x", pause_mode="retract").pause_mode == "retract"
    assert DistributedSyncConfig(pause_mode="in_place").pause_mode == "in_place"
