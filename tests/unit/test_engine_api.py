"""The built-in engine's SGLang native API, through the real app (httpx ASGITransport) on a real engine thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.models import init_tiny_model

Client = httpx.AsyncClient
Runner = Callable[[Callable[[Client], Coroutine[Any, Any, Any]]], Any]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engine-api")
    return init_tiny_model(root / "a", seed=0), init_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def engine(model_dirs: tuple[Path, Path]) -> Iterator[Engine]:
    eng = Engine(EngineConfig(model_path=str(model_dirs[0]), max_running_requests=8, context_length=512))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def run(engine: Engine, loop: asyncio.AbstractEventLoop) -> Runner:
    """Run `fn(client)` on the module's event loop with a client bound to the engine's app."""
    app = build_app(engine)

    def runner(fn: Callable[[Client], Coroutine[Any, Any, Any]]) -> Any:
        async def main() -> Any:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://engine", timeout=60
            ) as c:
                return await fn(c)

        return loop.run_until_complete(main())

    return runner


def _greedy(max_new: int, **extra: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True, **extra}


async def _gen(c: Client, ids: list[int], params: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = await c.post("/generate", json={"input_ids": ids, "sampling_params": params, **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def _wait_steps(engine: Engine, n: int) -> None:
    start = engine.scheduler.num_steps
    while engine.scheduler.num_steps < start + n:
        await asyncio.sleep(0.005)


def test_generate_response_has_sglang_fields(run: Runner, engine: Engine) -> None:
    """Guards against clients (slime/AReaL-style) breaking on field names, types or shapes of /generate."""

    async def body(c: Client) -> None:
        out = await _gen(c, [5, 6, 7], _greedy(5), return_logprob=True, rid="req-1")
        assert set(out) == {"text", "output_ids", "meta_info"}
        meta = out["meta_info"]
        assert meta["id"] == "req-1" and meta["finish_reason"] == {"type": "length", "length": 5}
        assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (3, 5, 0)
        assert meta["weight_version"] == "default" and isinstance(meta["e2e_latency"], float)
        assert len(out["output_ids"]) == 5 and isinstance(out["text"], str)
        triples = meta["output_token_logprobs"]
        assert [t[1] for t in triples] == out["output_ids"] and all(t[2] is None and t[0] <= 0 for t in triples)
        assert "input_token_logprobs" not in meta  # logprob_start_len defaults to -1
        # A batch in gives a list out; text is tokenised with the model's tokenizer; n expands.
        batch = (
            await c.post("/generate", json={"input_ids": [[1, 2], [3, 4, 5]], "sampling_params": _greedy(2)})
        ).json()
        assert [b["meta_info"]["prompt_tokens"] for b in batch] == [2, 3]
        text_out = (await c.post("/generate", json={"text": "The river", "sampling_params": _greedy(2)})).json()
        assert text_out["meta_info"]["prompt_tokens"] == len(engine.tokenizer.encode("The river"))
        many = (
            await c.post(
                "/generate", json={"input_ids": [1, 2], "rid": "x", "sampling_params": {"n": 2, "max_new_tokens": 3}}
            )
        ).json()
        assert [m["meta_info"]["id"] for m in many] == ["x_0", "x_1"]

    run(body)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_teacher_forced_hf_forward(
    run: Runner, model_dirs: tuple[Path, Path], temperature: float
) -> None:
    """Guards against the rollout logprobs drifting from what the learner recomputes: returned output and
    prompt logprobs equal log_softmax(logits / T) of an independent HF forward (T = 1 when greedy)."""
    prompt = [11, 42, 7, 300, 5, 9]
    params = {"max_new_tokens": 12, "temperature": temperature, "ignore_eos": True, "sampling_seed": 3}
    out = run(lambda c: _gen(c, prompt, params, return_logprob=True, logprob_start_len=0))
    ids = out["output_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dirs[0], dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    t = temperature if temperature > 0 else 1.0
    ref = torch.log_softmax(logits / t, dim=-1)
    want_out = ref[len(prompt) - 1 : -1].gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
    got_out = torch.tensor([x[0] for x in out["meta_info"]["output_token_logprobs"]])
    assert (got_out - want_out).abs().max() <= 1e-5
    inp = out["meta_info"]["input_token_logprobs"]
    assert inp[0] == [None, prompt[0], None] and [x[1] for x in inp] == prompt
    want_in = ref[: len(prompt) - 1].gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1)
    assert (torch.tensor([x[0] for x in inp[1:]]) - want_in).abs().max() <= 1e-5
    if temperature == 0.0:
        assert ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_concurrent_greedy_equals_sequential(run: Runner, engine: Engine) -> None:
    """Guards against continuous-batching bugs (ragged masks, slot reuse, joins and leaves mid-flight):
    requests of different lengths that join and finish at different times decode exactly as alone."""
    prompts = [[3] * 3, list(range(10, 20)), list(range(30, 55)), [8, 1, 8, 1, 8, 1], list(range(100, 140))]
    lengths = [30, 12, 25, 40, 18]

    async def sequential(c: Client) -> list[dict[str, Any]]:
        return [await _gen(c, p, _greedy(n), return_logprob=True) for p, n in zip(prompts, lengths, strict=True)]

    async def concurrent(c: Client) -> list[dict[str, Any]]:
        async def delayed(i: int) -> dict[str, Any]:
            await _wait_steps(engine, 3 * i)
            return await _gen(c, prompts[i], _greedy(lengths[i]), return_logprob=True)

        return list(await asyncio.gather(*(delayed(i) for i in range(len(prompts)))))

    alone = run(sequential)
    engine.scheduler.max_decode_batch = 0
    together = run(concurrent)
    assert engine.scheduler.max_decode_batch >= 3
    for a, b in zip(alone, together, strict=True):
        assert a["output_ids"] == b["output_ids"]
        lp_a = torch.tensor([x[0] for x in a["meta_info"]["output_token_logprobs"]])
        lp_b = torch.tensor([x[0] for x in b["meta_info"]["output_token_logprobs"]])
        assert (lp_a - lp_b).abs().max() <= 1e-5


def test_stop_token_and_stop_string_finish_and_trim(run: Runner, engine: Engine) -> None:
    """Guards against wrong finish_reason shapes, stop trimming, no_stop_trim, and ignore_eos semantics."""
    prompt = [20, 21, 22]

    async def body(c: Client) -> None:
        full = (await _gen(c, prompt, _greedy(10)))["output_ids"]
        k = 3
        stop_id = full[k]
        first = full.index(stop_id)
        out = await _gen(c, prompt, _greedy(10, ignore_eos=False, stop_token_ids=[stop_id]))
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
        assert out["output_ids"] == full[: first + 1]
        assert out["text"] == engine.tokenizer.decode(full[:first], skip_special_tokens=True)
        kept = await _gen(c, prompt, _greedy(10, ignore_eos=False, stop_token_ids=[stop_id], no_stop_trim=True))
        assert kept["text"] == engine.tokenizer.decode(full[: first + 1], skip_special_tokens=True)
        ignored = await _gen(c, prompt, _greedy(10, stop_token_ids=[stop_id]))  # ignore_eos disables stop tokens too
        assert ignored["meta_info"]["finish_reason"]["type"] == "length"
        text = engine.tokenizer.decode(full, skip_special_tokens=True)
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        assert stop.strip()
        out = await _gen(c, prompt, _greedy(10, stop=stop))
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert out["text"] == text[: text.find(stop)]

    run(body)


def test_seeded_sampling_is_reproducible(run: Runner) -> None:
    """Guards against sampling_seed being ignored (or a shared RNG making seeded results depend on traffic)."""
    params = {"max_new_tokens": 16, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 123}

    async def body(c: Client) -> tuple[list[int], list[int], list[int]]:
        a, b = await asyncio.gather(_gen(c, [1, 2, 3], params), _gen(c, [1, 2, 3], params))
        other = await _gen(c, [1, 2, 3], {**params, "sampling_seed": 124})
        return a["output_ids"], b["output_ids"], other["output_ids"]

    a, b, other = run(body)
    assert a == b and a != other


def test_pause_abort_returns_partial_outputs_and_holds_new_requests(run: Runner, engine: Engine) -> None:
    """Guards against pause(abort) losing in-flight work: the running request returns its partial tokens
    with finish_reason abort; requests sent while paused wait until continue_generation."""

    async def body(c: Client) -> None:
        long = asyncio.create_task(_gen(c, [4, 5, 6], _greedy(400), return_logprob=True))
        await _wait_steps(engine, 5)
        r = await c.post("/pause_generation", json={"mode": "abort"})
        assert r.status_code == 200 and r.json()["status"] == "ok"
        out = await long
        meta = out["meta_info"]
        assert meta["finish_reason"]["type"] == "abort" and meta["finish_reason"]["message"]
        assert 0 < meta["completion_tokens"] < 400
        assert len(out["output_ids"]) == len(meta["output_token_logprobs"]) == meta["completion_tokens"]
        held = asyncio.create_task(_gen(c, [4, 5, 6], _greedy(3)))
        await asyncio.sleep(0.3)
        assert not held.done()
        assert (await c.post("/continue_generation", json={})).status_code == 200
        assert (await held)["meta_info"]["finish_reason"]["type"] == "length"

    run(body)


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_retract_and_in_place_pause_resume_exactly(run: Runner, engine: Engine, mode: str) -> None:
    """Guards against resumed requests diverging: after retract (KV dropped and recomputed) or in_place
    (KV kept) the output equals an uninterrupted run; flush_cache is refused while KV is held in place."""

    async def body(c: Client) -> None:
        ref = await _gen(c, [9, 8, 7, 6], _greedy(60))
        task = asyncio.create_task(_gen(c, [9, 8, 7, 6], _greedy(60)))
        await _wait_steps(engine, 10)
        assert (await c.post("/pause_generation", json={"mode": mode})).status_code == 200
        await asyncio.sleep(0.05)
        assert not task.done()
        flush = await c.post("/flush_cache")
        assert flush.status_code == (200 if mode == "retract" else 400)
        assert (await c.post("/continue_generation")).status_code == 200
        out = await task
        assert out["output_ids"] == ref["output_ids"]
        assert out["meta_info"]["num_retractions"] == (1 if mode == "retract" else 0)

    run(body)


def test_flush_cache_refused_while_requests_run(run: Runner, engine: Engine) -> None:
    """Guards against flushing the KV cache under running requests (SGLang answers 400 then)."""

    async def body(c: Client) -> None:
        task = asyncio.create_task(_gen(c, [1, 2], _greedy(200)))
        await _wait_steps(engine, 3)
        busy = await c.get("/flush_cache")
        assert busy.status_code == 400 and "pending requests" in busy.text
        await task
        assert (await c.post("/flush_cache")).status_code == 200

    run(body)


def test_abort_request_by_rid_and_all(run: Runner, engine: Engine) -> None:
    """Guards against abort_request missing its target or aborting the wrong request."""

    async def body(c: Client) -> None:
        a = asyncio.create_task(_gen(c, [1, 2], _greedy(300), rid="keep"))
        b = asyncio.create_task(_gen(c, [1, 2], _greedy(300), rid="kill"))
        await _wait_steps(engine, 3)
        r = await c.post("/abort_request", json={"rid": "kill"})
        assert r.status_code == 200 and r.json()["success"]
        assert (await b)["meta_info"]["finish_reason"]["type"] == "abort"
        assert not a.done()
        await c.post("/abort_request", json={"abort_all": True})
        assert (await a)["meta_info"]["finish_reason"]["type"] == "abort"

    run(body)


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/generate", {}, "Either text or input_ids"),
        ("/generate", {"text": "a", "input_ids": [1]}, "Either text or input_ids"),
        ("/generate", {"input_ids": []}, "empty"),
        ("/generate", {"input_ids": [1, 10**6]}, "outside"),
        ("/generate", {"input_ids": "abc"}, "input_ids"),
        ("/generate", {"input_ids": [1], "sampling_params": {"top_p": 2}}, "top_p"),
        ("/generate", {"input_ids": [1], "sampling_params": {"max_token": 2}}, "unknown sampling_params: max_token"),
        ("/generate", {"input_ids": [1] * 600}, "longer than the model's context length"),
        ("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 5000}}, "exceeds the model's maximum"),
        ("/generate", {"input_ids": [1], "image_data": "x.png"}, "image_data is not supported"),
        ("/generate", {"input_ids": [[1], [2]], "rid": ["a", "a"]}, "Duplicate request IDs"),
        ("/generate", {"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params has 1 entries"),
        ("/pause_generation", {"mode": "later"}, "mode"),
        (
            "/update_weights_from_distributed",
            {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]},
            "no weight update group",
        ),
        ("/update_weights_from_distributed", {"names": ["x"], "dtypes": [], "shapes": [[1]]}, "differ in length"),
        (
            "/init_weights_update_group",
            {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "mpi"},
            "backend",
        ),
        ("/init_weights_update_group", {"master_address": "127.0.0.1"}, "master_port"),
        ("/destroy_weights_update_group", {"group_name": "nope"}, "no weight update group"),
        ("/update_weights_from_disk", {"model_path": "/nonexistent"}, "no config.json"),
    ],
)
def test_bad_requests_get_400_with_a_reason(run: Runner, path: str, body: dict[str, Any], reason: str) -> None:
    """Guards against bad input crashing (500), being silently accepted, or failing without saying why."""

    async def post(c: httpx.AsyncClient) -> httpx.Response:
        if path != "/update_weights_from_distributed":
            return await c.post(path, json=body)
        assert (await c.post("/begin_weight_update", json={})).status_code == 200  # else: refused for no session
        try:
            return await c.post(path, json=body)
        finally:
            await c.post("/end_weight_update", json={})

    r = run(post)
    assert r.status_code == 400, r.text
    assert reason in r.text


def test_control_endpoints_need_the_bearer_token(
    engine: Engine, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against an unauthenticated caller pausing or re-weighting a shared engine when a token is set."""
    monkeypatch.setenv(engine.config.api_key_env, "s3cret")
    app = build_app(engine)

    async def body() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine") as c:
            assert (await c.post("/pause_generation", json={})).status_code == 401
            bad = await c.post("/flush_cache", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401
            ok = await c.post(
                "/update_weight_version", json={"new_version": "default"}, headers={"Authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 200
            gen = await c.post("/generate", json={"input_ids": [1], "sampling_params": _greedy(1)})
            assert gen.status_code == 200

    loop.run_until_complete(body())


def test_update_weights_from_disk_switches_model_and_version(
    run: Runner, engine: Engine, model_dirs: tuple[Path, Path]
) -> None:
    """Guards against a disk update that does not take effect, takes effect partially, or forgets the version."""
    prompt = [7, 7, 3, 1]
    model_b = AutoModelForCausalLM.from_pretrained(model_dirs[1], dtype=torch.float32)
    with torch.no_grad():
        want = model_b.generate(
            torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )[0, 4:].tolist()

    async def body(c: Client) -> None:
        before = await _gen(c, prompt, _greedy(8))
        r = await c.post("/update_weights_from_disk", json={"model_path": str(model_dirs[1]), "weight_version": "7"})
        assert r.status_code == 200 and r.json()["success"], r.text
        assert (await c.get("/get_weight_version")).json() == {"weight_version": "7"}
        after = await _gen(c, prompt, _greedy(8))
        assert after["output_ids"] == want != before["output_ids"]
        assert after["meta_info"]["weight_version"] == "7"
        r = await c.post(
            "/update_weights_from_disk", json={"model_path": str(model_dirs[0]), "weight_version": "default"}
        )
        assert r.status_code == 200
        assert (await _gen(c, prompt, _greedy(8)))["output_ids"] == before["output_ids"]

    run(body)


def test_stream_sends_sse_chunks_then_done(run: Runner) -> None:
    """Guards against a streaming format SGLang clients cannot parse, or a final chunk that differs from /generate."""

    async def body(c: Client) -> tuple[str, dict[str, Any]]:
        r = await c.post("/generate", json={"input_ids": [2, 3], "sampling_params": _greedy(6), "stream": True})
        return r.text, await _gen(c, [2, 3], _greedy(6))

    raw, plain = run(body)
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert [len(ch["output_ids"]) for ch in chunks] == list(range(1, 7))
    assert all(ch["meta_info"]["finish_reason"] is None for ch in chunks[:-1])
    assert chunks[-1]["output_ids"] == plain["output_ids"] and chunks[-1]["text"] == plain["text"]


def test_openai_chat_and_completions(run: Runner, model_dirs: tuple[Path, Path]) -> None:
    """Guards against the local-judge path breaking: chat uses the chat template and returns OpenAI shapes."""
    tok = AutoTokenizer.from_pretrained(model_dirs[0])
    messages = [{"role": "user", "content": "Is the answer correct?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_len = len(tok.encode(text, add_special_tokens=False))

    async def body(c: Client) -> None:
        r = await c.post(
            "/v1/chat/completions", json={"model": "judge", "messages": messages, "max_tokens": 4, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "chat.completion" and out["model"] == "judge"
        choice = out["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert out["usage"]["prompt_tokens"] == prompt_len
        r = await c.post("/v1/completions", json={"prompt": "The river", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        s = await c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "stream": True})
        events = [e for e in s.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
        bad = await c.post("/v1/chat/completions", json={"messages": []})
        assert bad.status_code == 400
        models = (await c.get("/v1/models")).json()
        assert models["data"][0]["id"]

    run(body)


def test_info_and_health_endpoints(run: Runner, engine: Engine) -> None:
    """Guards against routers/monitors probing endpoints that are missing or shaped differently."""

    async def body(c: Client) -> None:
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/health_generate")).status_code == 200
        info = (await c.get("/get_model_info")).json()
        assert info["is_generation"] is True and info["model_type"] == "qwen3" and "weight_version" in info
        server = (await c.get("/get_server_info")).json()
        assert server["internal_states"][0]["num_running_reqs"] == 0 and "version" in server
        load = (await c.get("/get_load")).json()
        assert load[0]["num_reqs"] == 0
        r = await c.post("/update_weight_version", json={"new_version": "v3", "abort_all_requests": False})
        assert r.json() == {"success": True, "message": "Weight version updated to v3", "new_version": "v3"}
        assert (await c.get("/get_weight_version")).json()["weight_version"] == "v3"
        await c.post("/update_weight_version", json={"new_version": "default"})

    run(body)
