"""Context parallelism, sequence packing and the fused output head change the layout, never the maths: under real torchrun gloo ranks the
training step at CP2, CP2 x TP2 and CP2 x PP2 (packed), and CP2 padded, matches one rank without CP, and packed
matches padded: per-token logprobs at 1e-4, and after two optimizer steps the loss, grad norm, entropy, icepop
statistics and every exported weight. The fused head (default) matches megatron's logits path.

Two launches: one rank (the references: padded with megatron's logits path, and packed with the fused head), then four ranks running the CP layouts one
after the other on the same batch (CP2 alone leaves DP2, so the DP x CP gradient reduction takes part too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dist import run_torchrun
from tests.helpers.layout_runs import merged_weights, tiny_hf_model, train_and_record

STEPS = 2
SCENARIOS = (  # name, tp, pp, cp, packing
    ("cp2-packed", 1, 1, 2, True),
    ("cp2-padded", 1, 1, 2, False),
    ("cp2-tp2", 2, 1, 2, True),
    ("cp2-pp2", 1, 2, 2, True),
)
COMPARED = ("loss", "grad_norm", "logp_old_mean", "entropy", "is_ratio_mean", "is_modified_fraction", "num_loss_tokens")
LOGP_ATOL = 1e-4


def _config(hf: str, tp: int = 1, pp: int = 1, cp: int = 1, packing: bool = True, impl: str = "fused_head") -> Any:
    from learner.train_config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"hf_path": hf, "tp_size": tp, "pp_size": pp, "cp_size": cp},
            "data": {"dataset_path": "unused", "temperature": 0.8},
            # adam_eps well above float noise: elements whose gradient is ~0 must not flip sign between layouts
            "optim": {"lr": 1e-3, "clip_grad": 100.0, "adam_eps": 1e-4},
            "batch": {"max_tokens_per_micro_batch": 64, "pad_multiple": 4, "packing": packing, "logprob_impl": impl},
        }
    )


def _batch(vocab: int) -> Any:
    """2 groups x 4 samples, lengths 7..27 (ragged: packing and the CP chunks' padding both matter)."""
    import numpy as np
    import torch

    from learner.batching import TrainBatch, TrainSample
    from learner.loss import grpo_advantages

    rng = np.random.default_rng(11)
    samples = []
    for g in range(2):
        prompt = rng.integers(0, vocab, size=5 + 4 * g)
        adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.6, 0.2])).tolist()
        for i in range(4):
            resp = rng.integers(0, vocab, size=2 + 5 * i)
            logp = -np.log(vocab) + rng.uniform(-0.9, 0.9, size=len(resp))
            tokens = np.concatenate([prompt, resp]).astype(np.int32)
            samples.append(TrainSample(tokens, len(prompt), logp.astype(np.float32), adv[i]))
    return TrainBatch(samples, ["g0", "g1"], {})


def _token_logprobs(learner: Any, model: Any, batch: Any) -> list[list[float]] | None:
    """Every sample's per-token logprobs under `model`, put back together from the CP ranks' shares (last stage)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from learner.batching import Layout, build_micro_batch
    from learner.context_parallel import shard_positions
    from learner.train_step import device

    cp, rank = learner.layout.cp_size, parallel_state.get_context_parallel_rank()
    lay = Layout(1, True, cp)
    mb = build_micro_batch(batch.samples, list(range(len(batch.samples))), lay)
    assert mb.cu_seqlens is not None
    slots = torch.diff(mb.cu_seqlens).tolist()
    (logp,) = learner._logprobs(model, [mb.shard_for_cp(cp, rank).to(device())])
    if logp is None:
        return None
    shares: list[Any] = [None] * cp
    dist.all_gather_object(shares, logp.cpu(), group=parallel_state.get_context_parallel_group())
    whole = torch.zeros(mb.input_ids_BS.shape[1])
    for r, share in enumerate(shares):
        whole[shard_positions(slots, cp, r)] = share[0]
    starts = mb.cu_seqlens[:-1].tolist()
    return [whole[s : s + x.num_inputs].tolist() for s, x in zip(starts, batch.samples, strict=True)]


def _train(cfg: Any, out: Path, name: str) -> None:
    """Per-token logprobs of the batch, then STEPS steps on it; rank 0 writes both, stage leaders the weights."""

    def record_logprobs(learner: Any, model: Any, batch: Any) -> None:
        logp = _token_logprobs(learner, model, batch)
        if logp is not None and learner.layout.tp_rank == 0 and learner.layout.dp_rank == 0:
            (out / f"{name}-logp.json").write_text(json.dumps(logp))

    train_and_record(cfg, out, name, _batch, STEPS, before=record_logprobs)


def _reference_worker(tmp: str, hf: str) -> None:
    import datetime

    import torch.distributed as dist

    from learner.parallel import destroy_parallel

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    # the path before packing and the fused head (padded rows, full logits, megatron's cross entropy), then today's
    _train(_config(hf, packing=False, impl="megatron"), Path(tmp), "ref-padded")
    _train(_config(hf), Path(tmp), "ref-packed")
    destroy_parallel()


def _cp_worker(tmp: str, hf: str) -> None:
    import datetime

    import torch.distributed as dist

    from learner.parallel import destroy_parallel

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for name, tp, pp, cp, packing in SCENARIOS:
        _train(_config(hf, tp, pp, cp, packing), Path(tmp), name)
    destroy_parallel()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("context_parallel")
    hf = tiny_hf_model(tmp)
    kwargs = {"tmp": str(tmp), "hf": str(hf)}
    run_torchrun(1, f"{__name__}:_reference_worker", kwargs, timeout_s=300)
    run_torchrun(4, f"{__name__}:_cp_worker", kwargs, timeout_s=600)
    return tmp


def _assert_same_run(runs: Path, name: str, ref_name: str) -> None:
    import torch

    ref_logp = json.loads((runs / f"{ref_name}-logp.json").read_text())
    got_logp = json.loads((runs / f"{name}-logp.json").read_text())
    assert len(got_logp) == len(ref_logp)
    for k, (got, want) in enumerate(zip(got_logp, ref_logp, strict=True)):
        assert got == pytest.approx(want, abs=LOGP_ATOL), f"{name}: sample {k} logprobs"
    ref = json.loads((runs / f"{ref_name}.json").read_text())
    got_m = json.loads((runs / f"{name}.json").read_text())
    for step in range(STEPS):
        for key in COMPARED:
            assert got_m[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6), (name, step, key)
    ref_w, got_w = merged_weights(runs, ref_name), merged_weights(runs, name)
    assert sorted(got_w) == sorted(ref_w) and ref_w
    for key, value in ref_w.items():
        torch.testing.assert_close(got_w[key], value, rtol=1e-4, atol=2e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS])
def test_context_parallel_matches_one_rank(runs: Path, name: str) -> None:
    """Guards against a CP layout that changes the maths: a rank attending only to its own tokens (K/V not
    exchanged) or to later ones (the zig-zag chunks' causal offsets wrong), rotary positions of the local instead
    of the global token index, K/V gradients not summed back to their owner, per-token sums counted on one CP rank
    only (loss, token count, statistics) or twice, and the DP x CP gradient reduction."""
    _assert_same_run(runs, name, "ref-packed")


def test_packing_and_fused_head_match_the_padded_megatron_path(runs: Path) -> None:
    """Guards against packed sequences (THD) attending across a sequence boundary, rotary positions running on
    from the previous sequence instead of restarting, a packed micro-batch's tokens misaligned with their labels,
    advantages and rollout logprobs, and the fused head (output layer inside the chunked pass) differing from the
    model's logits through megatron's cross entropy: the same logprobs and the same two steps as before either."""
    _assert_same_run(runs, "ref-packed", "ref-padded")
    ref = json.loads((runs / "ref-padded.json").read_text())
    packed = json.loads((runs / "ref-packed.json").read_text())
    # the metric sees padding, and packing removes most of it
    assert ref[0]["padding_fraction"] > 0.1 and packed[0]["padding_fraction"] < ref[0]["padding_fraction"] / 2
