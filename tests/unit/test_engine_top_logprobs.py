"""Top-k logprobs (`top_logprobs_num`) of the built-in engine's native /generate, through the real app on a real
engine thread, checked against an independent transformers forward and SGLang's shapes (tokenizer_manager.py
`add_logprob_to_meta_info` / `detokenize_top_logprobs_tokens`)."""

from __future__ import annotations

import asyncio
import json
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
from rollout_server.engine.top_logprobs import MAX_TOP_LOGPROBS_NUM, top_rows
from rollout_server.models import init_tiny_model

PROMPT = [11, 42, 7, 300, 5, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny_model(tmp_path_factory.mktemp("engine-top-logprobs") / "m", seed=0)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine(EngineConfig(model_path=str(model_dir), max_running_requests=8, context_length=512, num_threads=1))
    eng.start()
    yield eng
    eng.shutdown()


def _post(engine: Engine, body: dict[str, Any]) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine", timeout=60) as c:
            return await c.post("/generate", json=body)

    return asyncio.run(main())


def _gen(engine: Engine, body: dict[str, Any]) -> Any:
    r = _post(engine, body)
    assert r.status_code == 200, r.text
    return r.json()


def _reference(model_dir: Path, ids: list[int], temperature: float) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)


def _check_rows(rows: list[Any], ref: torch.Tensor, k: int, engine: Engine, with_text: bool) -> None:
    assert len(rows) == ref.shape[0]
    want_values, _ = ref.topk(k, dim=-1)
    for row, want, pos in zip(rows, want_values, ref, strict=True):
        assert len(row) == k and all(len(t) == 3 for t in row)
        values = [t[0] for t in row]
        assert values == sorted(values, reverse=True)
        assert (torch.tensor(values) - want).abs().max() <= 1e-4
        assert (torch.tensor(values) - pos[[t[1] for t in row]]).abs().max() <= 1e-4  # each id's own logprob
        texts = [t[2] for t in row]
        assert texts == ([engine.tokenizer.decode([t[1]]) for t in row] if with_text else [None] * k)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_top_logprobs_equal_teacher_forced_hf_forward(engine: Engine, model_dir: Path, temperature: float) -> None:
    """Guards against top-k rows that are not the engine's logprob convention (log_softmax(logits / T), T = 1 when
    greedy) at the right positions, unsorted, of the wrong size, without the token texts asked for, or disagreeing
    with the sampled token's own logprob; prompt rows (logprob_start_len 2) aligned as input_token_logprobs."""
    k, start = 5, 2
    params = {"max_new_tokens": 10, "temperature": temperature, "ignore_eos": True, "sampling_seed": 7}
    body = {"input_ids": PROMPT, "sampling_params": params, "return_logprob": True, "top_logprobs_num": k}
    out = _gen(engine, {**body, "logprob_start_len": start, "return_text_in_logprobs": True})
    meta, ids = out["meta_info"], out["output_ids"]
    ref = _reference(model_dir, PROMPT + ids, temperature)
    _check_rows(meta["output_top_logprobs"], ref[len(PROMPT) - 1 : -1], k, engine, with_text=True)
    for (lp, tok, _), row in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        if tok in [t[1] for t in row]:  # the sampled token's entry is its own logprob
            assert abs(next(t[0] for t in row if t[1] == tok) - lp) <= 1e-6
        else:  # outside the top k: no more likely than the k-th
            assert lp <= row[-1][0] + 1e-6
    if temperature == 0.0:  # greedy: the sampled token is the top entry
        assert [row[0][1] for row in meta["output_top_logprobs"]] == ids
    assert len(meta["input_top_logprobs"]) == len(meta["input_token_logprobs"]) == len(PROMPT) - start
    _check_rows(meta["input_top_logprobs"], ref[start - 1 : len(PROMPT) - 1], k, engine, with_text=True)
    # from the first prompt token: its row is None, as its logprob (SGLang's [None] start)
    whole = _gen(engine, {**body, "logprob_start_len": 0})["meta_info"]
    assert whole["input_top_logprobs"][0] is None and whole["input_token_logprobs"][0][0] is None
    _check_rows(whole["input_top_logprobs"][1:], ref[: len(PROMPT) - 1], k, engine, with_text=False)
    _check_rows(whole["output_top_logprobs"], ref[len(PROMPT) - 1 : -1], k, engine, with_text=False)


def test_top_logprobs_only_where_asked_and_bounded(engine: Engine) -> None:
    """Guards against top-k rows leaking into answers that did not ask (0, or no return_logprob, as SGLang's
    `top_logprobs_num > 0` under return_logprob), a per-prompt list being applied to the wrong prompt, and a k above
    the vocabulary or the engine's cap being served (a 400 naming the field, not a crash or a huge answer)."""
    params = {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    both = _gen(
        engine,
        {"input_ids": [PROMPT, [3, 4]], "sampling_params": params, "return_logprob": True, "top_logprobs_num": [2, 0]},
    )
    assert [len(r) for r in both[0]["meta_info"]["output_top_logprobs"]] == [2, 2, 2]
    assert "output_top_logprobs" not in both[1]["meta_info"]
    assert "input_top_logprobs" not in both[0]["meta_info"]  # logprob_start_len -1: no prompt logprobs at all
    plain = _gen(engine, {"input_ids": PROMPT, "sampling_params": params, "top_logprobs_num": 3})
    assert "output_top_logprobs" not in plain["meta_info"] and "output_token_logprobs" not in plain["meta_info"]
    limit = min(engine.vocab_size, MAX_TOP_LOGPROBS_NUM)
    edge = _gen(
        engine, {"input_ids": PROMPT, "sampling_params": params, "return_logprob": True, "top_logprobs_num": limit}
    )
    assert all(len(r) == limit for r in edge["meta_info"]["output_top_logprobs"])
    for bad in (limit + 1, engine.vocab_size + 1):
        r = _post(engine, {"input_ids": PROMPT, "return_logprob": True, "top_logprobs_num": bad})
        assert r.status_code == 400 and "top_logprobs_num must be at most" in r.text, r.text
    assert engine.scheduler.alive


def test_streamed_top_logprobs_follow_output_token_logprobs(engine: Engine) -> None:
    """Guards against streamed chunks whose top-k rows fall out of step with their output_token_logprobs (each chunk
    carries one row per token so far, as SGLang's non-incremental stream) or differ from the non-streamed answer."""
    params = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    body = {"input_ids": PROMPT, "sampling_params": params, "return_logprob": True, "top_logprobs_num": 3}
    final = _gen(engine, body)["meta_info"]

    async def main() -> list[dict[str, Any]]:
        transport = httpx.ASGITransport(app=build_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine", timeout=60) as c:
            r = await c.post("/generate", json={**body, "stream": True})
            return [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]

    chunks = asyncio.run(main())
    assert len(chunks) == 6
    for n, chunk in enumerate(chunks, 1):
        meta = chunk["meta_info"]
        assert len(meta["output_top_logprobs"]) == len(meta["output_token_logprobs"]) == n
    assert chunks[-1]["meta_info"]["output_top_logprobs"] == final["output_top_logprobs"]


def test_top_rows_skip_rows_that_did_not_ask() -> None:
    """Guards against the batched top-k giving a row another row's k, computing rows nobody asked for, or failing
    on a batch where nobody asked (the cheap path of every ordinary decode step)."""
    logprobs = torch.log_softmax(torch.randn(3, 11), dim=-1)
    rows = top_rows(logprobs, [0, 4, 2])
    assert rows[0] is None and rows[1] is not None and rows[2] is not None
    values, ids = logprobs.topk(4, dim=-1)
    assert rows[1] == (values[1].tolist(), ids[1].tolist()) and rows[2] == (values[2, :2].tolist(), ids[2, :2].tolist())
    assert top_rows(logprobs, [0, 0, 0]) == [None, None, None]
    assert top_rows(logprobs, [11, 11, 11])[0] == (
        logprobs[0].sort(descending=True).values.tolist(),
        logprobs[0].sort(descending=True).indices.tolist(),
    )
