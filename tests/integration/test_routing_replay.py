"""Rollout routing replay (R3) end to end on a tiny Qwen3-MoE (8 experts, top-2, 2 layers): the built-in engine
(real HTTP app) returns the experts it routed every token to (SGLang's `return_routed_experts`), and the megatron
learner (2 real torchrun gloo ranks, at DP2 and at CP2, packed micro-batches) replays them with
`--model.routing_replay`.

Two engines serve the same weights except the routers: model A, and A with its router weights nudged so that some
tokens' top-2 experts flip. The learner always holds A's weights. On A's own rollouts its logprobs must match the
engine's; on the nudged engine's rollouts they must match transformers' A run with the nudged engine's expert
choices forced into its routers (weights from A's router logits), and must not match without replay.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.dist import run_torchrun
from tests.helpers.moe_models import NUM_EXPERTS, TOP_K, tiny_moe_model

ATOL = 1e-4
NUM_LAYERS = 2
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 64, 11], [8, 120, 33], [400, 2, 77, 301, 15, 9], [19, 23, 31, 1, 90]]
NEW_TOKENS = [12, 9, 14, 7]
# (name, cp_size): the 2 ranks as data-parallel ranks, or as context-parallel ranks of one DP rank
LAYOUTS = (("dp2", 1), ("cp2", 2))


def _nudged_copy(src: Path, dst: Path) -> Path:
    """`src` with every router weight nudged (the rest bit-identical): some tokens' top-k experts flip."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.25)
    model.save_pretrained(dst)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, dst / path.name)
    return dst


def _rollouts(model: Path) -> list[dict[str, Any]]:
    """Sampled rollouts of the built-in engine serving `model`, through its HTTP app, with logprobs and routing."""
    import httpx

    from rollout_server.engine.api import build_app
    from rollout_server.engine.config import EngineConfig
    from rollout_server.engine.engine import Engine
    from rollout_server.engine.server import BackgroundServer

    engine = Engine(EngineConfig(model_path=str(model), max_running_requests=4, context_length=256))
    engine.start()
    try:
        with BackgroundServer(build_app(engine)) as srv:
            body = {
                "input_ids": PROMPTS,
                "sampling_params": [
                    {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 11 + i}
                    for i, n in enumerate(NEW_TOKENS)
                ],
                "return_logprob": True,
                "return_routed_experts": True,
            }
            r = httpx.post(srv.url + "/generate", json=body, timeout=120)
            assert r.status_code == 200, r.text
            outs = r.json()
    finally:
        engine.shutdown()
    rollouts = []
    for prompt, out in zip(PROMPTS, outs, strict=True):
        tokens = prompt + out["output_ids"]
        routed = np.frombuffer(base64.b64decode(out["meta_info"]["routed_experts"]), dtype=np.int32)
        rollouts.append(
            {
                "tokens": tokens,
                "prompt_len": len(prompt),
                "logp": [v for v, _, _ in out["meta_info"]["output_token_logprobs"]],
                "routed": routed.reshape(len(tokens) - 1, NUM_LAYERS, TOP_K).tolist(),
            }
        )
    return rollouts


def _hf_logprobs(path: Path, tokens: list[int], forced: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logprob of tokens[1:] and its routers' top-k ids [len - 1, layers, topk] on tokens[:-1]; with
    `forced`, each router's choice replaced by those ids (weights: its softmax over them, renormalised)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    chosen: list[torch.Tensor] = []

    def hook(layer: int, module: Any, args: Any, output: tuple[torch.Tensor, ...]) -> Any:
        logits, weights, idx = output
        if forced is None:
            chosen.append(idx)
            return None
        idx = torch.from_numpy(forced[:, layer].astype(np.int64))
        w = torch.softmax(logits.float(), dim=-1).gather(1, idx)
        chosen.append(idx)
        return logits, (w / w.sum(dim=-1, keepdim=True)).to(logits.dtype), idx

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o))
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)
    return logp.double().numpy(), torch.stack(chosen, dim=1).numpy()


def _learner_worker(tmp: str, hf: str) -> None:
    """Each rank: the learner's old-logprob pass on every data set, with and without replay, under each layout;
    writes its response tokens' logprobs as (sample, position, logp) rows."""
    import torch.distributed as dist

    from learner.batching import TrainSample, build_micro_batch, plan_micro_batches
    from learner.context_parallel import shard_positions
    from learner.model.hf_config import load_hf_arch
    from learner.parallel import destroy_parallel, init_parallel
    from learner.train_config import TrainConfig
    from learner.train_step import Learner, build_model_and_optimizer, device
    from tests.helpers.dist import init_worker_process_group

    init_worker_process_group(timeout_s=120)
    data = json.loads(Path(tmp, "rollouts.json").read_text())
    out: dict[str, list[list[float]]] = {}
    for name, cp in LAYOUTS:
        for replay in (False, True):
            cfg = TrainConfig.model_validate(
                {
                    "model": {"hf_path": hf, "cp_size": cp, "routing_replay": replay},
                    "data": {"dataset_path": "unused", "temperature": 1.0},
                    "batch": {"max_tokens_per_micro_batch": 40, "pad_multiple": 4, "packing": True},
                }
            )
            layout = init_parallel(cfg.model)
            arch = load_hf_arch(hf)
            model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=True)
            learner = Learner(cfg, arch, layout, model, optimizer)
            for source, rollouts in data.items():
                samples = [
                    TrainSample(
                        np.array(r["tokens"], dtype=np.int32),
                        r["prompt_len"],
                        np.array(r["logp"], dtype=np.float32),
                        0.0,
                        np.array(r["routed"], dtype=np.int32),
                    )
                    for r in rollouts
                ]
                lengths = [s.num_inputs for s in samples]
                plan = plan_micro_batches(lengths, layout.dp_size, 40, learner.mb_layout)
                rows: list[list[float]] = []
                for idx in plan[layout.dp_rank]:
                    full = build_micro_batch(samples, idx, learner.mb_layout)
                    mb = full.shard_for_cp(cp, learner._cp_rank).to(device())
                    (logp,) = learner._logprobs(learner.model, [mb])
                    assert logp is not None and full.cu_seqlens is not None
                    seq_lens = torch.diff(full.cu_seqlens).tolist()
                    positions = (
                        shard_positions(seq_lens, cp, learner._cp_rank) if cp > 1 else torch.arange(sum(seq_lens))
                    )
                    starts = full.cu_seqlens.tolist()
                    for j, pos in enumerate(positions.tolist()):
                        if mb.loss_mask_BS[0, j] > 0:
                            k = max(k for k, s in enumerate(starts[:-1]) if s <= pos)
                            rows.append([idx[k], pos - starts[k], float(logp[0, j])])
                out[f"{name}/{'replay' if replay else 'plain'}/{source}"] = rows
            destroy_parallel(keep_process_group=True)
    Path(tmp, f"learner-rank{dist.get_rank()}.json").write_text(json.dumps(out))
    destroy_parallel()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("r3")
    model = tiny_moe_model(tmp / "a", seed=0)
    nudged = _nudged_copy(model, tmp / "a-nudged")
    data = {"own": _rollouts(model), "nudged": _rollouts(nudged)}
    (tmp / "rollouts.json").write_text(json.dumps(data))
    run_torchrun(2, f"{__name__}:_learner_worker", {"tmp": str(tmp), "hf": str(model)}, timeout_s=500)
    merged: dict[str, dict[tuple[int, int], float]] = {}
    for part in sorted(tmp.glob("learner-rank*.json")):
        for key, rows in json.loads(part.read_text()).items():
            got = merged.setdefault(key, {})
            for i, pos, v in rows:
                got[(int(i), int(pos))] = v
    return {"model": model, "nudged": nudged, "data": data, "learner": merged}


def _learner_response_logp(runs: dict[str, Any], key: str, i: int) -> np.ndarray:
    """Sample i's response-token logprobs from the learner run `key` (every CP/DP rank's share merged)."""
    r = runs["data"][key.rsplit("/", 1)[1]][i]
    got = runs["learner"][key]
    positions = range(r["prompt_len"] - 1, len(r["tokens"]) - 1)
    missing = [p for p in positions if (i, p) not in got]
    assert not missing, f"{key}: sample {i} positions {missing} not computed by any rank"
    return np.array([got[(i, p)] for p in positions])


def test_engine_returns_the_experts_its_routers_chose(runs: dict[str, Any]) -> None:
    """Guards the engine's capture (prefill and decode rows, padded batch rows, layer order, the base64 int32
    [prompt + output - 1, layers, topk] format): the ids are transformers' own router choices on the rollout."""
    for key, path in (("own", runs["model"]), ("nudged", runs["nudged"])):
        for r in runs["data"][key]:
            _, hf_ids = _hf_logprobs(path, r["tokens"], None)
            engine_ids = np.array(r["routed"])
            assert engine_ids.shape == (len(r["tokens"]) - 1, NUM_LAYERS, TOP_K)
            assert engine_ids.min() >= 0 and engine_ids.max() < NUM_EXPERTS
            np.testing.assert_array_equal(np.sort(engine_ids, axis=-1), np.sort(hf_ids, axis=-1))


def test_nudged_routers_flip_some_choices(runs: dict[str, Any]) -> None:
    """The premise of the replay tests: the nudged engine routes some (not all) tokens to other experts than A."""
    flipped = total = 0
    for r in runs["data"]["nudged"]:
        _, own_ids = _hf_logprobs(runs["model"], r["tokens"], None)
        diff = np.any(np.sort(own_ids, axis=-1) != np.sort(np.array(r["routed"]), axis=-1), axis=-1)
        flipped, total = flipped + int(diff.sum()), total + diff.size
    assert 0 < flipped < total, (flipped, total)


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
def test_replay_matches_the_engines_logprobs(runs: dict[str, Any], layout: str) -> None:
    """Guards the sample -> micro-batch row mapping of the routing (packing offsets, CP zig-zag shards, token-major
    order inside the router): replaying the engine's own routing gives the engine's logprobs."""
    worst = 0.0
    for i, r in enumerate(runs["data"]["own"]):
        got = _learner_response_logp(runs, f"{layout}/replay/own", i)
        worst = max(worst, float(np.abs(got - np.array(r["logp"])).max()))
    assert worst < ATOL, worst


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
def test_replay_routes_as_the_engine_did(runs: dict[str, Any], layout: str) -> None:
    """Guards the replay itself: on the nudged engine's rollouts the learner (A's weights) must use the engine's
    experts with weights from its own router (transformers' A with those experts forced, within 1e-4), and without
    replay it routes by itself and differs (the mismatch R3 removes)."""
    replayed = plain = 0.0
    for i, r in enumerate(runs["data"]["nudged"]):
        forced, _ = _hf_logprobs(runs["model"], r["tokens"], np.array(r["routed"]))
        ref = forced[r["prompt_len"] - 1 :]
        replayed = max(replayed, float(np.abs(_learner_response_logp(runs, f"{layout}/replay/nudged", i) - ref).max()))
        plain = max(plain, float(np.abs(_learner_response_logp(runs, f"{layout}/plain/nudged", i) - ref).max()))
    assert replayed < ATOL, replayed
    assert plain > 100 * ATOL, plain


def test_routing_travels_with_the_batch_and_lands_on_its_tokens() -> None:
    """Guards the learner-side transport of routing (rank 0's batch broadcast, packing, CP shards): each sample's
    rows reach its own tokens' positions, samples without routing get -1 (the router's own choice)."""
    from learner.batching import (
        Layout,
        TrainBatch,
        TrainSample,
        batch_from_tensors,
        batch_to_tensors,
        build_micro_batch,
    )
    from learner.context_parallel import shard_positions

    rng = np.random.default_rng(0)

    def sample(n: int, routed: bool) -> TrainSample:
        ids = rng.integers(0, NUM_EXPERTS, size=(n - 1, NUM_LAYERS, TOP_K)).astype(np.int32) if routed else None
        return TrainSample(np.arange(n, dtype=np.int32), 2, np.zeros(n - 2, dtype=np.float32), 1.0, ids)

    batch = TrainBatch([sample(9, True), sample(6, False), sample(12, True)], ["g"], {})
    meta, tensors = batch_to_tensors(batch)
    got = batch_from_tensors(meta, tensors).samples
    np.testing.assert_array_equal(got[0].routed_experts, batch.samples[0].routed_experts)
    np.testing.assert_array_equal(got[2].routed_experts, batch.samples[2].routed_experts)
    assert got[1].routed_experts is not None and (got[1].routed_experts == -1).all()
    got[1].routed_experts = None
    layout = Layout(pad_multiple=4, packing=True, cp_size=2)
    full = build_micro_batch(got, [0, 1, 2], layout)
    assert full.routed_experts_BSLK is not None and full.cu_seqlens is not None
    starts = full.cu_seqlens.tolist()
    for k, s in enumerate(got):
        rows = full.routed_experts_BSLK[0, starts[k] : starts[k + 1]]
        if s.routed_experts is None:
            assert (rows == -1).all()
        else:
            np.testing.assert_array_equal(rows[: s.num_inputs].numpy(), s.routed_experts)
            assert (rows[s.num_inputs :] == -1).all()  # padding: the router's own choice
    for rank in range(2):
        shard = full.shard_for_cp(2, rank)
        index = shard_positions(torch.diff(full.cu_seqlens).tolist(), 2, rank)
        assert shard.routed_experts_BSLK is not None
        assert torch.equal(shard.routed_experts_BSLK[0], full.routed_experts_BSLK[0, index])
