"""Scaled RoPE (YaRN, linear) in the learner's megatron model and in the built-in engine, against transformers.

The models are tiny random Qwen3s with DeepSeek-R1-0528-Qwen3-8B's rope block scaled down 512x (original context
32768 -> 64, max_position_embeddings 131072 -> 256, factor 4, its attn_factor), and the sequences run past the
original context. The engines' reading of that block is SGLang's: its attn_factor multiplies YaRN's attention
factor (1.1386 * 0.8782 = 1.0), which transformers ignores; so its transformers reference is Qwen3ForCausalLM with
the rotary module's attention_scaling set to SGLang's factor. The other blocks read the same in both and are checked
against transformers untouched.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dist import init_worker_process_group, run_torchrun
from tests.integration.test_megatron_model import _forward_logits, _gather_vocab

ATOL = 1e-4
ORIGINAL, MAX_POS = 64, 256  # DeepSeek-R1-0528-Qwen3-8B: 32768 and 131072
R1_ATTN_FACTOR = 0.8782488562869419
# name -> (rope block, rope_theta, whether transformers reads the block as SGLang does)
ROPES: dict[str, tuple[dict[str, Any], float, bool]] = {
    "yarn_r1_8b": (
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "attn_factor": R1_ATTN_FACTOR,
        },
        1e6,
        False,
    ),
    "yarn_mscale": (  # every other YaRN knob, at a base where the ramp spans several dimensions
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 0.9,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
        1e4,
        True,
    ),
    "linear": ({"rope_type": "linear", "factor": 2.0}, 1e4, True),
}
LAYOUTS = ((1, 1, "sdpa"), (2, 1, "megatron"), (1, 2, "sdpa"))  # (tp, pp, core attention) on 2 ranks
SEQ, BATCH = 160, 2  # > ORIGINAL: positions beyond the original context


def sglang_attention_factor(rope: dict[str, Any]) -> float:
    """SGLang's YaRN mscale (rotary_embedding/yarn.py), written out here so the reference does not use the code
    under test; 1 for linear."""
    if rope["rope_type"] != "yarn":
        return 1.0

    def get_mscale(m: float) -> float:
        return 0.1 * m * math.log(rope["factor"]) + 1.0

    if "mscale" in rope and "mscale_all_dim" in rope:
        base = get_mscale(rope["mscale"]) / get_mscale(rope["mscale_all_dim"])
    else:
        base = get_mscale(1.0)
    return base * float(rope.get("attn_factor", 1.0))


def write_model(path: Path, name: str, seed: int) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    rope, theta, _ = ROPES[name]
    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=300,
        max_position_embeddings=MAX_POS,
        rope_parameters={**rope, "rope_theta": theta},
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # random norms, as test_megatron_model.py: a misplaced norm shows
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def reference_model(path: Path, name: str, device: Any = "cpu") -> Any:
    """transformers' Qwen3ForCausalLM on `path`, scaling cos/sin as SGLang does."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    rope, _, same_in_transformers = ROPES[name]
    rotary = model.model.rotary_emb
    if same_in_transformers:
        assert rotary.attention_scaling == pytest.approx(sglang_attention_factor(rope), rel=1e-12)
    else:
        rotary.attention_scaling = sglang_attention_factor(rope)
    return model


def _parity_worker(tmp: str) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    from learner.config import LearnerModelConfig
    from learner.logprobs import shifted_token_logprobs
    from learner.model.build import build_model
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import destroy_parallel, init_parallel

    device = init_worker_process_group()
    root = Path(tmp)
    if dist.get_rank() == 0:
        for seed, name in enumerate(ROPES):
            write_model(root / name, name, seed)
    dist.barrier()

    for name in ROPES:
        path = root / name
        ref_model = reference_model(path, name, device)
        arch = load_hf_arch(path)
        assert arch.rope_scaling is not None and arch.rope_scaling.rope_type == ROPES[name][0]["rope_type"]
        ids = torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7)).to(device)
        with torch.no_grad():
            ref_logits = ref_model(ids).logits.float()
        ref_lp = torch.log_softmax(ref_logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for i, (tp, pp, attention) in enumerate(LAYOUTS):
            where = f"{name} tp{tp} pp{pp} {attention}"
            cfg = LearnerModelConfig(hf_path=str(path), tp_size=tp, pp_size=pp, core_attention=attention)
            init_parallel(cfg)
            # The first layout also builds the model with plain RoPE: the comparison must be able to fail.
            variants = [(arch, where)] + ([(dataclasses.replace(arch, rope_scaling=None), "plain")] if i == 0 else [])
            for variant, label in variants:
                model = build_model(variant, cfg)
                load_hf_weights(model, path, variant)
                model.eval()
                with torch.no_grad():
                    logits = _forward_logits(model, ids)
                if logits is None:
                    continue
                full = _gather_vocab(logits, arch.vocab_size)
                diff = (full - ref_logits).abs().max().item()
                lp = shifted_token_logprobs(logits, ids, 1.0, arch.vocab_size)
                lp_diff = (lp - ref_lp).abs().max().item()
                if label == "plain":
                    assert lp_diff > 100 * ATOL, f"{where}: plain RoPE matches too ({lp_diff}): the test is vacuous"
                    continue
                # Past the original context, where YaRN's interpolated frequencies take effect.
                tail = (lp[:, ORIGINAL:] - ref_lp[:, ORIGINAL:]).abs().max().item()
                assert diff <= ATOL and lp_diff <= ATOL, f"{where}: logits differ by {diff}, logprobs by {lp_diff}"
                if parallel_rank_zero():
                    print(f"ok {where} max|logit diff| {diff:.1e} max|logprob diff| {lp_diff:.1e} "
                          f"(positions >= {ORIGINAL}: {tail:.1e})", flush=True)  # fmt: skip
            destroy_parallel(keep_process_group=True)
    destroy_parallel()


def parallel_rank_zero() -> bool:
    from megatron.core import parallel_state

    return bool(parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0)


def test_learner_rope_scaling_matches_transformers(tmp_path: Path) -> None:
    """Guards against the learner scoring YaRN/linear-RoPE models with the wrong positions: plain frequencies (the
    old build), YaRN's ramp or original context wrong, the attention factor (mscale, attn_factor) dropped or
    applied once instead of to both q and k, or lost on a later pipeline stage. Logits and per-token logprobs
    over 160 tokens (original context 64) must match transformers within 1e-4 at TP1, TP2 and PP2."""
    output = run_torchrun(2, f"{__name__}:_parity_worker", {"tmp": str(tmp_path)}, timeout_s=400)
    for name in ROPES:
        for tp, pp, attention in LAYOUTS:
            assert f"ok {name} tp{tp} pp{pp} {attention}" in output, output[-3000:]
    print("\n".join(line for line in output.splitlines() if "]:ok " in line))


@pytest.mark.parametrize("name", ["yarn_r1_8b", "yarn_mscale"])
def test_engine_generates_with_yarn_like_transformers(tmp_path: Path, name: str) -> None:
    """Guards against the built-in engine serving a YaRN model with transformers' reading of attn_factor (cos/sin
    1.14x too large for DeepSeek-R1-0528-Qwen3-8B, unlike SGLang) or refusing the config: a request whose prompt
    and completion run past the original context returns the logprobs of a full forward of transformers'
    Qwen3ForCausalLM (SGLang's attention factor), prompt and completion, within 1e-4."""
    import httpx
    import torch

    from rollout_server.engine.api import build_app
    from rollout_server.engine.config import EngineConfig
    from rollout_server.engine.engine import Engine
    from rollout_server.models import init_tiny_model

    path = init_tiny_model(
        tmp_path / "m", hidden_size=64, num_layers=2, vocab_size=300, max_position_embeddings=MAX_POS
    )
    rope, theta, _ = ROPES[name]
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_parameters"] = {**rope, "rope_theta": theta}
    config_file.write_text(json.dumps(config))

    engine = Engine(EngineConfig(model_path=str(path), max_running_requests=2, context_length=MAX_POS, num_threads=1))
    engine.start()
    prompt = torch.randint(0, 300, (ORIGINAL - 4,), generator=torch.Generator().manual_seed(3)).tolist()
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": 0,
    }

    async def generate() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=build_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine", timeout=60) as c:
            r = await c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out

    try:
        out = asyncio.run(generate())
    finally:
        engine.shutdown()
    ids = out["output_ids"]
    whole = prompt + ids
    assert len(whole) > ORIGINAL + 16
    with torch.no_grad():
        logits = reference_model(path, name)(torch.tensor([whole])).logits[0].float()
    ref = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(whole[1:]).unsqueeze(-1)).squeeze(-1)
    meta = out["meta_info"]
    got = [x[0] for x in meta["input_token_logprobs"][1:]] + [x[0] for x in meta["output_token_logprobs"]]
    diff = (torch.tensor(got) - ref).abs().max().item()
    assert diff <= ATOL, f"{name}: engine logprobs differ from transformers by {diff}"
    assert ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    print(f"ok engine {name} max|logprob diff| {diff:.1e}")
