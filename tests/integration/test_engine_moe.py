"""The built-in engine serving a tiny Qwen3-MoE (transformers' `Qwen3MoeForCausalLM`, 8 experts, top-2): logprobs
against transformers' own, and weight updates under the per-expert names of an HF checkpoint (what the learner
exports and pushes) landing in the slices of transformers' fused 3-D expert parameters."""

from __future__ import annotations

import threading
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
from rollout_server.engine.model_runner import ModelRunner
from rollout_server.engine.server import BackgroundServer
from tests.helpers.moe_models import NUM_EXPERTS, per_expert, tiny_moe_model

ATOL = 1e-4
# Different lengths in one batch: padded tokens are routed too, and must change no real token's experts.
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 64, 11], [8, 120, 33], [400, 2, 77, 301, 15, 9]]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A (served first), B (per-expert tensors on disk, as the learner's export writes) and B again with
    transformers' fused expert tensors on disk."""
    root = tmp_path_factory.mktemp("moe")
    return (
        tiny_moe_model(root / "a", seed=0),
        tiny_moe_model(root / "b", seed=1),
        tiny_moe_model(root / "b-fused", seed=1, fused_on_disk=True),
    )


@pytest.fixture(scope="module")
def server(models: tuple[Path, Path, Path]) -> Iterator[tuple[Engine, str]]:
    engine = Engine(EngineConfig(model_path=str(models[0]), max_running_requests=4, context_length=256))
    engine.start()
    with BackgroundServer(build_app(engine)) as srv:
        yield engine, srv.url
    engine.shutdown()


def _reference(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' logprob of each token of `ids` after the first (one unpadded sequence)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).double()


def _engine_logprobs(url: str, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[str]]:
    """The engine's prompt logprobs of every prompt, all in one batch (one request with a list of prompts)."""
    body = {
        "input_ids": prompts,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    outs = r.json()
    values = [torch.tensor([v for v, _, _ in o["meta_info"]["input_token_logprobs"][1:]]).double() for o in outs]
    return values, [o["meta_info"]["weight_version"] for o in outs]


def _max_diff(url: str, reference: Any) -> float:
    got, _ = _engine_logprobs(url, PROMPTS)
    return max(float((g - _hf_logprobs(reference, p)).abs().max()) for g, p in zip(got, PROMPTS, strict=True))


def test_engine_serves_a_moe_model_with_transformers_logprobs(
    server: tuple[Engine, str], models: tuple[Path, Path, Path]
) -> None:
    """Guards against the engine refusing Qwen3-MoE, or running its sparse blocks wrongly against our KV cache
    (the dense fused-MLP path applied to a MoE layer, padded tokens mixing into real tokens' routing, prefill vs
    decode disagreeing): batched prompt logprobs of different lengths match transformers' own within 1e-4, and
    greedy decoding through the cache gives transformers' tokens."""
    engine, url = server
    assert engine.runner.config.model_type == "qwen3_moe"
    assert all(lw.moe is not None for lw in engine.runner.fused)
    reference = _reference(models[0])
    assert _max_diff(url, reference) <= ATOL
    prompt = PROMPTS[0]
    r = httpx.post(
        url + "/generate",
        json={"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert r.json()["output_ids"] == want[0, len(prompt) :].tolist()


def test_per_expert_updates_reach_the_fused_expert_parameters(
    server: tuple[Engine, str], models: tuple[Path, Path, Path]
) -> None:
    """Guards against weight updates that miss MoE weights: the learner names experts one by one
    (`mlp.experts.{e}.gate_proj.weight`), transformers holds them fused (`mlp.experts.gate_up_proj` [E, 2I, H]);
    an update refused as unknown, written to the wrong expert or the wrong half (gate vs up), or landing in a copy
    instead of the served parameter. B's per-expert tensors are loaded (the scheduler's own load path, then a
    disk load of the per-expert and of the fused checkpoint) and the engine then serves B's logprobs; an expert
    index past the model's is refused by name, before anything is written."""
    engine, url = server
    runner = engine.runner
    ref_a, ref_b = _reference(models[0]), _reference(models[1])
    named = sorted(per_expert(ref_b.state_dict(), tied=True).items())
    assert any(".mlp.experts.7.up_proj.weight" in n for n, _ in named)
    before = _max_diff(url, ref_b)
    assert before > 1e-2, "model B must differ from A for this test to mean anything"

    bad = [("model.layers.0.mlp.experts.8.gate_proj.weight", torch.zeros(32, 64)), *named]
    with pytest.raises(ValueError, match=f"expert 8 out of range \\(the model has {NUM_EXPERTS}\\)"):
        engine.scheduler.call(lambda: runner.load_weights(bad)).result(timeout=60)  # on the scheduler thread
    assert _max_diff(url, ref_a) <= ATOL  # nothing written

    engine.scheduler.call(lambda: engine.weights._swap(named, "b", True, "")).result(timeout=60)
    assert _max_diff(url, ref_b) <= ATOL
    assert httpx.get(url + "/get_weight_version", timeout=10).json()["weight_version"] == "b"
    fused = runner.parameter_names()["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(fused[3, 32:], ref_b.state_dict()["model.layers.1.mlp.experts.gate_up_proj"][3, 32:])

    for path, back_to in ((models[0], ref_a), (models[2], ref_b), (models[1], ref_b)):
        r = httpx.post(url + "/update_weights_from_disk", json={"model_path": str(path)}, timeout=60)
        assert r.status_code == 200 and r.json()["success"], r.text
        assert _max_diff(url, back_to) <= ATOL, path


def test_weight_targets_are_views_of_the_fused_parameters(models: tuple[Path, Path, Path]) -> None:
    """Guards against per-expert targets that are copies (a paused engine receives broadcasts straight into
    them: a copy would drop the update) or not contiguous (the broadcast needs contiguous buffers), and against
    the disk staging treating a per-expert checkpoint as missing the fused parameters."""
    runner = ModelRunner(str(models[0]), num_slots=1, context_length=32)
    targets = runner.weight_targets()
    assert set(runner.expert_parts) == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }
    fused = runner.parameter_names()["model.layers.0.mlp.experts.gate_up_proj"]
    for e in range(NUM_EXPERTS):
        for proj, rows in (("gate", slice(0, 32)), ("up", slice(32, 64))):
            t = targets[f"model.layers.0.mlp.experts.{e}.{proj}_proj.weight"]
            assert t.is_contiguous() and t.data_ptr() == fused[e, rows].data_ptr() and t.shape == (32, 64)
        assert targets[f"model.layers.0.mlp.experts.{e}.down_proj.weight"].shape == (64, 32)

    staged = runner.stage_from_disk(str(models[1]), threading.Event())
    assert staged is not None and len(staged) == len(per_expert(_reference(models[1]).state_dict(), tied=True))
