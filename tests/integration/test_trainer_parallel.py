"""The training step under real torchrun gloo ranks: TP/PP/DP layouts agree with one rank; the update's sign.

Two launches: one rank (the TP1/DP1 reference, and a run where rewarded tokens must gain probability),
then two ranks running DP2, DP2 with the distributed optimizer, TP2 and PP2 one after the other on the
same batch. Each scenario takes two optimizer steps with several micro-batches per rank (a small token
budget), so the global per-token normaliser, the old-logprob pass, icepop and Adam all take part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dist import run_torchrun
from tests.helpers.layout_runs import merged_weights, tiny_hf_model, train_and_record

STEPS = 2
SCENARIOS = (  # name, tp, pp, distributed optimizer
    ("dp2", 1, 1, False),
    ("dp2-distopt", 1, 1, True),
    ("tp2", 2, 1, False),
    ("pp2", 1, 2, False),
)
# Compared per step against the one-rank reference.
COMPARED = ("loss", "grad_norm", "logp_old_mean", "entropy", "is_ratio_mean", "is_modified_fraction", "num_loss_tokens")


def _config(hf: str, tp: int = 1, pp: int = 1, dist_opt: bool = False, dtype: str = "fp32", **loss: Any) -> Any:
    from learner.train_config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"hf_path": hf, "tp_size": tp, "pp_size": pp, "dtype": dtype},
            "data": {"dataset_path": "unused", "temperature": 0.8},
            # adam_eps well above float noise: elements whose gradient is ~0 must not flip sign between layouts
            "optim": {"lr": 1e-3, "clip_grad": 100.0, "adam_eps": 1e-4, "distributed_optimizer": dist_opt},
            "batch": {"max_tokens_per_micro_batch": 48, "pad_multiple": 4},
            "loss": loss,
        }
    )


def _batch(vocab: int) -> Any:
    """3 groups x 4 samples of varied lengths with GRPO advantages and engine logprobs near the model's."""
    import numpy as np
    import torch

    from learner.batching import TrainBatch, TrainSample
    from learner.loss import grpo_advantages

    rng = np.random.default_rng(7)
    samples = []
    for g in range(3):
        prompt = rng.integers(0, vocab, size=4 + 2 * g)
        adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.7, 0.0]) * (g + 1) / 3).tolist()
        for i in range(4):
            resp = rng.integers(0, vocab, size=2 + 3 * i)
            logp = -np.log(vocab) + rng.uniform(-0.9, 0.9, size=len(resp))
            samples.append(
                TrainSample(
                    np.concatenate([prompt, resp]).astype(np.int32), len(prompt), logp.astype(np.float32), adv[i]
                )
            )
    return TrainBatch(samples, [f"g{g}" for g in range(3)], {})


def _train(cfg: Any, out: Path, name: str) -> None:
    """STEPS steps on the fixed batch; rank 0 writes the metrics, every stage leader its exported weights."""
    train_and_record(cfg, out, name, _batch, STEPS)


def _reference_worker(tmp: str, hf: str, dtype: str = "fp32") -> None:
    """TP1/DP1 on the batch; then the sign check: repeated steps on one group with a rewarded and an unrewarded
    response must raise the rewarded response's logprob and lower the other's."""
    import datetime

    import numpy as np
    import torch.distributed as dist

    from learner.batching import Layout, TrainBatch, TrainSample, build_micro_batch
    from learner.model.hf_config import load_hf_arch
    from learner.parallel import destroy_parallel, init_parallel
    from learner.train_step import Learner, build_model_and_optimizer, build_reference_model, device

    dist.init_process_group(timeout=datetime.timedelta(seconds=120))  # gloo on CPU, NCCL on GPU
    out = Path(tmp)
    _train(_config(hf, dtype=dtype), out, "reference")

    cfg = _config(hf, dtype=dtype, importance_correction="none")
    layout = init_parallel(cfg.model)
    arch = load_hf_arch(hf)
    model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=True)
    learner = Learner(cfg, arch, layout, model, optimizer)
    prompt = [3, 14, 15, 92, 65]
    good, bad = [35, 89, 79, 32], [38, 46, 26, 43]
    rollout = np.full(4, -5.0, dtype=np.float32)
    samples = [
        TrainSample(np.array(prompt + good, dtype=np.int32), len(prompt), rollout, 0.7071),  # reward 1
        TrainSample(np.array(prompt + bad, dtype=np.int32), len(prompt), rollout, -0.7071),  # reward 0
    ]
    mb = build_micro_batch(samples, [0, 1], Layout(pad_multiple=1)).to(device())

    def response_logp() -> list[float]:
        (logp,) = learner._logprobs(model, [mb])
        assert logp is not None
        return (logp * mb.loss_mask_BS).sum(dim=1).tolist()

    before = response_logp()
    for _ in range(4):
        learner.train_step(TrainBatch(samples, ["g"], {}))
    after = response_logp()
    (out / "sign.json").write_text(json.dumps({"before": before, "after": after}))

    # The logged entropy against torch's, with padded vocabulary rows that must not count (nor NaN the gradient).
    import torch

    from learner.train_step import vocab_parallel_entropy

    logits = torch.randn(2, 3, 16, device=mb.input_ids_BS.device, requires_grad=True)
    ours = vocab_parallel_entropy(logits, 0.8, vocab_size=13)
    ours.sum().backward()
    theirs = torch.distributions.Categorical(logits=logits.detach()[..., :13] / 0.8).entropy()
    assert logits.grad is not None
    entropy = {"max_err": (ours - theirs).abs().max().item(), "grad_finite": bool(logits.grad.isfinite().all())}
    (out / "entropy.json").write_text(json.dumps(entropy))

    # KL to the frozen initial model (+ entropy bonus), and SFT, through the same step.
    modes = {}
    for mode, cfg in (
        ("kl", _config(hf, dtype=dtype, kl_coef=0.5, entropy_coef=0.01)),
        ("sft", _config(hf, dtype=dtype, mode="sft")),
    ):
        model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=True)
        ref = build_reference_model(cfg, arch) if mode == "kl" else None
        learner = Learner(cfg, arch, layout, model, optimizer, ref)
        modes[mode] = [learner.train_step(_batch(arch.vocab_size)) for _ in range(3)]
    (out / "modes.json").write_text(json.dumps(modes))
    destroy_parallel()


def _parallel_worker(tmp: str, hf: str) -> None:
    import datetime

    import torch.distributed as dist

    from learner.parallel import destroy_parallel

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for name, tp, pp, dist_opt in SCENARIOS:
        _train(_config(hf, tp, pp, dist_opt), Path(tmp), name)

    # Rank 0 never completes a batch: it tells the waiting rank why and both fail fast instead of hanging.
    from learner.trainer import BatchChannel

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=30))
    channel = BatchChannel(group, (lambda block_s: None) if dist.get_rank() == 0 else None, 0.05, timeout_s=0.5)
    try:
        channel.next_batch()
        error = "no error"
    except (TimeoutError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    Path(tmp, f"channel-rank{dist.get_rank()}.txt").write_text(error)
    destroy_parallel()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trainer_parallel")
    hf = tiny_hf_model(tmp)
    kwargs = {"tmp": str(tmp), "hf": str(hf)}
    run_torchrun(1, f"{__name__}:_reference_worker", kwargs, timeout_s=300)
    run_torchrun(2, f"{__name__}:_parallel_worker", kwargs, timeout_s=300)
    return tmp


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS])
def test_parallel_layouts_match_one_rank(runs: Path, name: str) -> None:
    """Guards against a loss or gradient that depends on the layout: per-micro-batch or per-rank normalisation
    instead of the global token count, a DP rank dropping or duplicating samples, TP-sharded logprobs/entropy
    reduced wrongly, PP losing the old logprobs on the last stage, or the distributed optimizer diverging."""
    import torch

    ref = json.loads((runs / "reference.json").read_text())
    got = json.loads((runs / f"{name}.json").read_text())
    for step in range(STEPS):
        for key in COMPARED:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6), (name, step, key)
    assert ref[0]["num_micro_batches"] > 1  # the budget really split the batch
    assert 0 < ref[0]["is_modified_fraction"] < 1  # icepop zeroed some tokens, not all
    ref_w, got_w = merged_weights(runs, "reference"), merged_weights(runs, name)
    assert sorted(got_w) == sorted(ref_w)
    for key, value in ref_w.items():
        torch.testing.assert_close(got_w[key], value, rtol=1e-4, atol=2e-6, msg=f"{name}: {key}")


def test_rewarded_response_gains_probability(runs: Path) -> None:
    """Guards against a flipped sign anywhere in advantage -> surrogate -> gradient -> optimizer: after a few steps
    the positive-advantage response must be more likely and the negative one less likely."""
    sign = json.loads((runs / "sign.json").read_text())
    (good_before, bad_before), (good_after, bad_after) = sign["before"], sign["after"]
    assert good_after > good_before + 0.1
    assert bad_after < bad_before - 0.1


def test_entropy_matches_torch_and_ignores_vocab_padding(runs: Path) -> None:
    """Guards against the logged entropy (and the optional bonus) counting padded vocabulary rows, using the wrong
    temperature, or producing NaN gradients through the padding."""
    entropy = json.loads((runs / "entropy.json").read_text())
    assert entropy["max_err"] < 1e-5
    assert entropy["grad_finite"]


def test_kl_to_the_initial_model_and_sft_mode_train(runs: Path) -> None:
    """Guards against the reference model not being the initial policy (KL must be 0 at the first step and grow
    after updates), a KL/entropy term that breaks the step, and SFT mode not lowering the demonstrations' NLL."""
    modes = json.loads((runs / "modes.json").read_text())
    kl = [m["kl"] for m in modes["kl"]]
    assert abs(kl[0]) < 1e-6 < kl[1] < kl[2]
    sft = [m["loss"] for m in modes["sft"]]
    assert sft[0] > sft[1] > sft[2] > 0
    assert "pg_loss" not in modes["sft"][0] and "clip_fraction" not in modes["sft"][0]
    # A demonstration's reward is a placeholder: SFT steps report no reward figures (a constant 1 in TensorBoard)
    assert not {"accuracy", "reward_mean"} & set(modes["sft"][0])


def test_waiting_ranks_fail_fast_when_rank_0_gives_up(runs: Path) -> None:
    """Guards against the other ranks hanging in the batch broadcast (until a long collective timeout) when rank 0
    cannot assemble a batch: both must end with an error that names the reason and the flag."""
    rank0 = (runs / "channel-rank0.txt").read_text()
    rank1 = (runs / "channel-rank1.txt").read_text()
    assert rank0.startswith("TimeoutError") and "--batch.batch_timeout_s" in rank0
    assert rank1.startswith("RuntimeError: rank 0 gave up") and "--batch.batch_timeout_s" in rank1


@pytest.mark.gpu
def test_train_step_bf16_on_gpu(tmp_path: Path) -> None:
    """Guards the CUDA path (NCCL, bf16 Float16Module, megatron's fused optimizer): the step runs, its metrics
    are finite, and the rewarded response still gains probability."""
    import math

    from rollout_server.models import init_tiny_model

    hf = init_tiny_model(tmp_path / "hf", hidden_size=64, num_layers=2, vocab_size=300, num_heads=4, num_kv_heads=2)
    run_torchrun(1, f"{__name__}:_reference_worker", {"tmp": str(tmp_path), "hf": str(hf), "dtype": "bf16"}, 300)
    for step in json.loads((tmp_path / "reference.json").read_text()):
        assert all(math.isfinite(step[k]) for k in COMPARED), step
    test_rewarded_response_gains_probability(tmp_path)
    test_entropy_matches_torch_and_ignores_vocab_padding(tmp_path)
