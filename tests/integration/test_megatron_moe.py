"""Qwen3-MoE in the megatron learner against transformers, on 2 real torchrun gloo ranks.

Two tiny Qwen3-MoE models (8 experts, 2 layers, hidden 64): one with norm_topk_prob (top-2, untied, saved
one tensor per expert) and one without (top-3, tied embeddings, saved with transformers' fused 3-D expert
tensors). One launch checks, at TP1 x DP2, EP2, TP2 and PP2: per-token logprob parity with transformers on
different inputs (and lengths) per data-parallel rank, and the bit-exact HF -> megatron -> HF round trip
(iterator and exported directory); deliberately broken routing and expert placement must fail the parity
check. A second launch trains GRPO steps at EP1 and EP2 and compares them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dist import init_worker_process_group, run_torchrun
from tests.helpers.moe_models import per_expert

# (tp, pp, ep); the remaining factor of the 2 ranks is DP
LAYOUTS = ((1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1))
PARITY_ATOL = 1e-4
SEQ, BATCH = 20, 2
NUM_EXPERTS = 8
# The two models: (norm_topk_prob, top-k, tied embeddings, fused expert tensors on disk)
MODELS = {"norm-top2": (True, 2, False, False), "softmax-top3": (False, 3, True, True)}


def _tiny_moe_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    paths = {}
    for seed, (name, (norm, topk, tie, fused)) in enumerate(MODELS.items()):
        config = Qwen3MoeConfig(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=300,  # padded to 128 * tp in megatron
            max_position_embeddings=128,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=topk,
            norm_topk_prob=norm,
            tie_word_embeddings=tie,
        )
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:  # HF initialises norms to 1; random ones make a swapped norm visible
                    p.uniform_(0.5, 1.5)
                elif pname.endswith("mlp.gate.weight"):  # confident routing: a wrong weighting shows
                    p.normal_(0.0, 0.5)
                elif ".mlp.experts." in pname:  # experts that move the residual stream: a wrong expert shows
                    p.normal_(0.0, 0.2)
        paths[name] = root / name
        model.save_pretrained(paths[name], save_original_format=not fused)
    return paths


def _logprobs_diff(model: Any, ref_model: Any, ids: Any, vocab: int) -> float | None:
    """max |megatron - transformers| over per-token logprobs (T=1) on the last stage; None elsewhere."""
    import torch

    from learner.logprobs import shifted_token_logprobs
    from tests.integration.test_megatron_model import _forward_logits

    with torch.no_grad():
        logits = _forward_logits(model, ids)
        if logits is None:
            return None
        ref = torch.log_softmax(ref_model(ids).logits.float()[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])
        return float((shifted_token_logprobs(logits, ids, 1.0, vocab) - ref.squeeze(-1)).abs().max())


def _break_expert_offsets(model: Any, ref_state: dict[str, Any], arch: Any) -> None:
    """Load every EP rank's experts as if it were EP rank 0 (global expert index = local index)."""
    import torch
    from megatron.core import parallel_state

    from learner.model.build import unwrap
    from learner.model.load import stage_param_maps

    maps = stage_param_maps(model, arch, ep_rank=0)
    etp = parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size()
    with torch.no_grad():
        for name, param in unwrap(model).named_parameters():
            if maps[name].expert:
                param.copy_(maps[name].to_local([ref_state[n] for n in maps[name].hf_names], *etp))


def _parity_worker(tmp: str, layouts: list[list[int]]) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from learner.config import LearnerModelConfig
    from learner.model.build import build_model, unwrap
    from learner.model.export import export_hf, iter_hf_weights
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import current_layout, destroy_parallel, init_parallel

    device = init_worker_process_group()
    root = Path(tmp)
    paths = _tiny_moe_models(root / "hf") if dist.get_rank() == 0 else {}
    obj = [paths]
    dist.broadcast_object_list(obj, src=0)
    paths = obj[0]

    for family, path in paths.items():
        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        arch = load_hf_arch(path)
        assert arch.moe is not None
        ref_state = per_expert(ref_model.state_dict(), arch.tie_word_embeddings)
        for tp, pp, ep in layouts:
            where = f"{family} tp{tp} pp{pp} ep{ep}"
            init_parallel(LearnerModelConfig(hf_path=str(path), tp_size=tp, pp_size=pp, ep_size=ep))
            layout = current_layout()
            cfg = LearnerModelConfig(hf_path=str(path), tp_size=tp, pp_size=pp, ep_size=ep)
            model = build_model(arch, cfg)
            load_hf_weights(model, path, arch)
            model.eval()
            # Each DP rank its own tokens and length: EP ranks exchange unequal token counts.
            gen = torch.Generator().manual_seed(7 + layout.dp_rank)
            ids = torch.randint(0, arch.vocab_size, (BATCH, SEQ + 4 * layout.dp_rank), generator=gen).to(device)
            diff = _logprobs_diff(model, ref_model, ids, arch.vocab_size)
            if diff is not None:
                assert diff <= PARITY_ATOL, f"{where}: logprobs differ from transformers by {diff}"

            # Round trip through the iterator: every HF tensor exactly once over the stages, bit-exact.
            exported = dict(iter_hf_weights(model, arch))
            if not layout.is_stage_leader:
                assert not exported, f"{where}: rank {layout.rank} is not a stage leader but yielded tensors"
            for name, tensor in exported.items():
                assert torch.equal(tensor.cpu(), ref_state[name].cpu()), f"{where}: {name} changed in the round trip"
            names: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(names, sorted(exported))
            flat = [n for part in names for n in part]
            assert sorted(flat) == sorted(ref_state), f"{where}: names differ: {sorted(set(flat) ^ set(ref_state))}"

            # Round trip through a written HF directory that transformers loads.
            out = root / f"export-{family}-tp{tp}-pp{pp}-ep{ep}"
            export_hf(model, out, path)
            if dist.get_rank() == 0:
                reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
                for name, tensor in reloaded.state_dict().items():
                    assert torch.equal(tensor, ref_model.state_dict()[name]), f"{where}: exported {name} differs"

            if family == "norm-top2" and ep == 2:
                config = unwrap(model).config
                for bug in ("experts_without_ep_offset", "topk_not_renormalised"):
                    if bug == "experts_without_ep_offset":
                        _break_expert_offsets(model, ref_state, arch)
                    else:
                        config.moe_router_pre_softmax = not config.moe_router_pre_softmax
                    bad = torch.tensor(_logprobs_diff(model, ref_model, ids, arch.vocab_size) or 0.0)
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # one EP rank's wrong experts hurt both
                    assert bad > 100 * PARITY_ATOL, f"{where} {bug}: parity check missed it (diff {bad})"
                    print(f"caught {where} {bug}: max|logprob diff| {float(bad):.1e}", flush=True)
                    config.moe_router_pre_softmax = not arch.moe.norm_topk_prob
                    load_hf_weights(model, path, arch)
            if diff is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                print(f"ok {where} dp{layout.dp_rank} max|logprob diff| {diff:.1e}", flush=True)
            destroy_parallel(keep_process_group=True)
    destroy_parallel()


def test_qwen3_moe_matches_transformers_and_round_trips(tmp_path: Path) -> None:
    """Guards the Qwen3-MoE mapping: a wrong router score function or top-k renormalisation, an expert loaded at
    the wrong global index under EP, a swapped gate/up or expert TP split, fused HF expert tensors misread, or a
    dispatcher that cannot take unequal token counts over EP ranks breaks logprob parity with transformers or the
    bit-exact round trip at TP1 x DP2, EP2, TP2 or PP2 (and the deliberately broken routing and expert placement
    must be caught)."""
    output = run_torchrun(2, f"{__name__}:_parity_worker", {"tmp": str(tmp_path), "layouts": LAYOUTS}, timeout_s=400)
    for family in MODELS:
        for tp, pp, ep in LAYOUTS:
            assert f"ok {family} tp{tp} pp{pp} ep{ep}" in output, output[-3000:]
    if "ok norm-top2 tp1 pp1 ep2 dp1" not in output:
        raise AssertionError(output[-3000:])


def test_qwen3_moe_expert_parallel_with_tp_and_pp_on_four_ranks(tmp_path: Path) -> None:
    """Guards EP combined with TP and PP (4 ranks): experts sharded over the expert-TP group and the EP group at
    once, or EP ranks inside a pipeline stage, must still match transformers and round-trip bit-exactly."""
    layouts = ((2, 1, 2), (1, 2, 2))
    output = run_torchrun(4, f"{__name__}:_parity_worker", {"tmp": str(tmp_path), "layouts": layouts}, timeout_s=400)
    for family in MODELS:
        for tp, pp, ep in layouts:
            assert f"ok {family} tp{tp} pp{pp} ep{ep} dp1" in output, output[-3000:]


# ---------------------------------------------------------------- training: EP2 against EP1

STEPS = 2
COMPARED = ("loss", "grad_norm", "logp_old_mean", "entropy", "num_loss_tokens")
MOE_METRICS = ("moe_expert_load_max", "moe_expert_load_min")
REPLAY_METRICS = ("moe_replayed_fraction", "moe_replay_changed_fraction")


def _config(hf: str, ep: int, aux: float | None, pp: int = 1, replay: bool = False) -> Any:
    from learner.train_config import TrainConfig

    # With replay, PP2 also recomputes every layer in the backward (the recomputed routers must replay too).
    recompute = {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1} if pp > 1 else {}
    return TrainConfig.model_validate(
        {
            "model": {"hf_path": hf, "ep_size": ep, "pp_size": pp, "moe_aux_loss_coeff": aux}
            | ({"routing_replay": True} | recompute if replay else {}),
            "data": {"dataset_path": "unused", "temperature": 0.8},
            "optim": {"lr": 1e-3, "clip_grad": 100.0, "adam_eps": 1e-4},
            "batch": {"max_tokens_per_micro_batch": 48, "pad_multiple": 4},
        }
    )


def _batch(vocab: int, lengths: list[int], routed: bool = False) -> Any:
    """One GRPO group per 4 samples of the given prompt + response lengths, engine logprobs near the model's;
    `routed`: with engine routing (random distinct experts per token and layer, top-2) for routing replay."""
    import numpy as np
    import torch

    from learner.batching import TrainBatch, TrainSample
    from learner.loss import grpo_advantages

    rng = np.random.default_rng(3)
    samples = []
    for g in range(0, len(lengths), 4):
        adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.6, 0.2])).tolist()
        for i, n in enumerate(lengths[g : g + 4]):
            tokens = rng.integers(0, vocab, size=n).astype(np.int32)
            logp = -np.log(vocab) + rng.uniform(-0.5, 0.5, size=n - 4)
            experts = None
            if routed:
                ranks = rng.random((n - 1, 2, NUM_EXPERTS)).argsort(axis=-1)  # [tokens, layers, experts]
                experts = ranks[..., :2].astype(np.int32)
            samples.append(TrainSample(tokens, 4, logp.astype(np.float32), adv[i], experts))
    return TrainBatch(samples, [f"g{g}" for g in range(0, len(lengths), 4)], {})


# Same micro-batch count on both DP ranks, different token counts; and counts that differ (EP evens them out).
EQUAL_COUNTS = [30, 22, 13, 9, 28, 17, 12, 6]
UNEQUAL_COUNTS = [41, 31, 21, 7]


def _train_worker(tmp: str, hf: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from learner.model.build import unwrap
    from learner.parallel import destroy_parallel
    from tests.helpers.layout_runs import train_and_record

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    routers_scaled: list[bool] = []

    def check_routers(learner: Any, model: Any, batch: Any) -> None:
        """Record the routers' per-token flag in every pass that computes the aux loss."""

        def record(router: Any, args: Any, output: Any) -> None:
            if router.training and torch.is_grad_enabled():
                routers_scaled.append(bool(router.calculate_per_token_loss))

        for layer in unwrap(model).decoder.layers:
            layer.mlp.router.register_forward_hook(record)

    for name, ep, pp, aux, lengths in (
        ("ep1", 1, 1, None, EQUAL_COUNTS),
        ("ep2", 2, 1, None, EQUAL_COUNTS),
        ("ep1-uneven", 1, 1, 0.0, UNEQUAL_COUNTS),
        ("ep2-uneven", 2, 1, 0.0, UNEQUAL_COUNTS),
        ("pp2-uneven", 1, 2, 0.0, UNEQUAL_COUNTS),
        ("ep1-replay", 1, 1, 0.0, UNEQUAL_COUNTS),
        ("pp2-replay", 1, 2, 0.0, UNEQUAL_COUNTS),
    ):
        before = check_routers if name == "ep2" else None
        replay = name.endswith("replay")
        cfg = _config(hf, ep, aux, pp, replay)
        train_and_record(cfg, Path(tmp), name, lambda v, n=lengths, r=replay: _batch(v, n, r), STEPS, before)
    Path(tmp, f"routers-rank{dist.get_rank()}.json").write_text(json.dumps(routers_scaled))
    destroy_parallel()


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("moe_train")
    hf = _tiny_moe_models(tmp / "hf")["norm-top2"]
    run_torchrun(2, f"{__name__}:_train_worker", {"tmp": str(tmp), "hf": str(hf)}, timeout_s=400)
    return tmp


def test_micro_batch_plans_exercise_both_cases() -> None:
    """Guards the training test's premise: the first batch gives both DP ranks as many micro-batches but unequal
    tokens (the padded dispatcher), the second unequal micro-batch counts (the EP equalisation)."""
    from learner.batching import Layout, plan_micro_batches

    layout = Layout(pad_multiple=4, packing=True)
    even = plan_micro_batches([n - 1 for n in EQUAL_COUNTS], 2, 48, layout)
    assert len(even[0]) == len(even[1]) and even[0] != even[1]
    uneven = plan_micro_batches([n - 1 for n in UNEQUAL_COUNTS], 2, 48, layout)
    assert len(uneven[0]) != len(uneven[1])


@pytest.mark.parametrize(
    ("name", "ref"),
    [("ep2", "ep1"), ("ep2-uneven", "ep1-uneven"), ("pp2-uneven", "ep1-uneven"), ("pp2-replay", "ep1-replay")],
)
def test_expert_parallel_step_matches_ep1(moe_runs: Path, name: str, ref: str) -> None:
    """Guards expert parallelism in training: EP2 (experts split over the two DP ranks, tokens exchanged by the
    dispatcher) must give EP1's loss, grad norm, routing metrics and updated weights. Catches an expert gradient
    reduced over the wrong group or scaled wrongly, a grad norm missing or double-counting EP shards, a dispatcher
    that drops or duplicates tokens, an export that loses other EP ranks' experts, and (uneven) EP ranks that run
    different numbers of micro-batches (a hang or a collective error). PP2 (one DP rank) checks the routing
    metrics' reduction over pipeline stages. PP2 with replay recomputes every layer in the backward after 1F1B ran
    the next micro-batch's forward: a recomputed router that replays another micro-batch's routing (or its own
    choice) gives other gradients."""
    import torch

    from tests.helpers.layout_runs import merged_weights

    want = json.loads((moe_runs / f"{ref}.json").read_text())
    got = json.loads((moe_runs / f"{name}.json").read_text())
    keys = COMPARED + MOE_METRICS + (("moe_aux_loss",) if name == "ep2" else ())
    keys += REPLAY_METRICS if name.endswith("replay") else ()
    for step in range(STEPS):
        for key in keys:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (name, step, key)
        assert 0 <= got[step]["moe_expert_load_min"] <= 1 / NUM_EXPERTS <= got[step]["moe_expert_load_max"] <= 1
    if name == "ep2":
        assert got[0]["moe_aux_loss"] > 0
    else:
        assert "moe_aux_loss" not in got[0]  # coefficient 0: megatron computes no aux loss
    ref_w, got_w = merged_weights(moe_runs, ref), merged_weights(moe_runs, name)
    assert sorted(got_w) == sorted(ref_w) and any(".mlp.experts.7." in k for k in got_w)
    for key, value in ref_w.items():
        torch.testing.assert_close(got_w[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def test_router_scales_aux_loss_per_token(moe_runs: Path) -> None:
    """Guards the aux-loss gradient scale: megatron's router copies `calculate_per_token_loss` when built, but the
    trainer sets it afterwards; unsynced, the aux-loss gradient is divided by the step's token count."""
    for rank in range(2):
        flags = json.loads((moe_runs / f"routers-rank{rank}.json").read_text())
        assert flags and all(flags), flags


def test_replay_changes_training_and_reports_its_share(moe_runs: Path) -> None:
    """Guards that replay reaches the training passes and that its metrics count: random engine routing must change
    the loss against the same batch routed by the learner, every real token must be replayed (padding is not), and
    most replayed tokens must differ from the learner's own top-2 (random experts rarely match)."""
    plain = json.loads((moe_runs / "ep1-uneven.json").read_text())
    replay = json.loads((moe_runs / "ep1-replay.json").read_text())
    assert replay[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)
    assert "moe_replayed_fraction" not in plain[0]
    m = replay[0]
    assert 0 < m["padding_fraction"] < 0.5  # packed rows padded to a multiple of 4: some tokens are not replayed
    assert m["moe_replayed_fraction"] == pytest.approx(1 - m["padding_fraction"], rel=1e-6)
    assert 0.7 < m["moe_replay_changed_fraction"] <= 1
