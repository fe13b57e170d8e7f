"""The engine's batched forward over the slot KV cache, checked against the HF model's own forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rollout_server.engine.kv_cache import KVCache
from rollout_server.engine.model_runner import ModelRunner
from rollout_server.models import init_tiny_model


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_ragged_prefill_and_decode_match_hf_forward(tmp_path: Path, arch: str) -> None:
    """Guards against masking, RoPE, GQA, q/k-norm or KV-slot bugs: sequences of different lengths in
    non-adjacent slots, prefilled together then decoded twice, give the logits of HF's full forward."""
    runner = ModelRunner(str(init_tiny_model(tmp_path / arch, arch=arch, seed=2)), num_slots=6, context_length=64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 2, 17)]
    slots = [5, 1, 3]  # not a dense run: exercises the gather path
    last, full = runner.forward(slots, seqs, [0, 0, 0], all_logits_for=[0, 1, 2])
    steps = [[[7], [8], [9]], [[10], [11], [12]]]
    decoded = []
    for k, step in enumerate(steps):
        out, _ = runner.forward(slots, step, [len(s) + k for s in seqs])
        decoded.append(out)
    for b, seq in enumerate(seqs):
        whole = seq + [s[b][0] for s in steps]
        ref = runner.model(torch.tensor([whole])).logits[0].float()
        assert (full[b] - ref[: len(seq)]).abs().max() <= 1e-5
        assert (last[b] - ref[len(seq) - 1]).abs().max() <= 1e-5
        for k in range(len(steps)):
            assert (decoded[k][b] - ref[len(seq) + k]).abs().max() <= 1e-5


def test_dense_slot_run_reads_the_same_as_a_gather(tmp_path: Path) -> None:
    """Guards against the view fast path (dense slots) reading other slots than the gather path."""
    runner = ModelRunner(str(init_tiny_model(tmp_path / "m", seed=4)), num_slots=4, context_length=32)
    seqs = [[1, 2, 3, 4], [5, 6]]
    dense, _ = runner.forward([1, 2], seqs, [0, 0])
    gathered, _ = runner.forward([3, 0], seqs, [0, 0])
    assert torch.allclose(dense, gathered, atol=1e-6)


def test_load_weights_checks_everything_before_writing(tmp_path: Path) -> None:
    """Guards against a half-applied update: one bad name or shape must leave every parameter untouched."""
    runner = ModelRunner(str(init_tiny_model(tmp_path / "m", seed=5)), num_slots=1, context_length=16)
    name = "model.layers.0.mlp.up_proj.weight"
    before = runner.parameter_names()[name].clone()
    good = (name, torch.zeros_like(before))
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        runner.load_weights([good, ("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        runner.load_weights([good, ("model.norm.weight", torch.zeros(3))])
    assert torch.equal(runner.parameter_names()[name], before)
    runner.load_weights([good])
    assert not runner.parameter_names()[name].any()
    # Tied embeddings: lm_head.weight is accepted and is the embedding.
    emb = runner.parameter_names()["lm_head.weight"]
    runner.load_weights([("lm_head.weight", torch.ones_like(emb))])
    assert runner.parameter_names()["model.embed_tokens.weight"].eq(1).all()


def test_kv_cache_hands_out_lowest_slots_first() -> None:
    """Guards against slot fragmentation defeating the dense-run fast path, and against double frees."""
    cache = KVCache(1, 3, 1, 4, 2, torch.float32, torch.device("cpu"))
    assert [cache.alloc() for _ in range(3)] == [0, 1, 2]
    cache.free(1)
    cache.free(0)
    assert cache.alloc() == 0
    with pytest.raises(AssertionError):
        cache.free(1)
