"""The fused-head logprob path (learner/logprobs.py `head_logprobs_and_entropy`, learner/model/head.py) against the
logits path, on 2 real torchrun gloo ranks at TP2 then TP1 (x DP2), in one launch shared by both tests:

- the function alone against logits = hidden @ weight.T through megatron's vocab-parallel cross entropy and
  `vocab_parallel_entropy` (with the hidden copied into the TP region, as megatron's ColumnParallelLinear does):
  logp, entropy and the gradients of hidden and weight at 1e-5, with vocab padding, a ragged last chunk, a
  temperature, a non-contiguous hidden, and the entropy's gradient on and off;
- a real tiny Qwen3-shaped GPTModel in megatron DDP (untied, tied embeddings; a bf16 Float16Module one at TP2), whose
  logits through `logprobs_and_entropy` must give the same logprobs, entropies and parameter gradients (DDP main_grad)
  as the same model after `enable_hidden_output` through `head_logprobs_and_entropy(hidden, output_weight(model))`.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.dist import init_worker_process_group, run_torchrun

ATOL = 1e-5
BF16_RTOL = 2e-2  # bf16 model: the two paths round differently (the weight grad is summed per chunk, in fp32)
TPS = (2, 1)
VOCAB, TEMPERATURE, CHUNK = 300, 0.7, 5


def _function_parity(tp: int, rank: int) -> None:
    import torch
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from learner.logprobs import head_logprobs_and_entropy, token_logprobs
    from learner.train_step import vocab_parallel_entropy

    vocab, padded, b, s, h = 37, 40, 3, 11, 16  # 3 padding rows of the vocab
    gen = torch.Generator().manual_seed(0)
    hidden_sbh = torch.randn(s, b, h, generator=gen)  # megatron's layout; the [b, s, h] view below is non-contiguous
    full_weight = torch.randn(padded, h, generator=gen) * 0.7  # logits of std ~3
    target = torch.randint(0, vocab, (b, s), generator=gen)
    w_lp, w_h = torch.randn(b, s, generator=gen), torch.randn(b, s, generator=gen)
    weight = full_weight.chunk(tp)[rank]
    for chunk in (CHUNK, 4096):  # several chunks with a ragged last one; one chunk
        for with_entropy_grad in (True, False):
            where = f"function tp{tp} chunk {chunk} entropy grad {with_entropy_grad}"
            ref_h, ref_w = hidden_sbh.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            # transpose first: megatron's _reduce all-reduces a copy (a no-op) when the gradient is non-contiguous
            logits = copy_to_tensor_model_parallel_region(ref_h.transpose(0, 1)) @ ref_w.t()
            ref_lp = token_logprobs(logits, target, TEMPERATURE, vocab)
            with torch.set_grad_enabled(with_entropy_grad):
                ref_ent = vocab_parallel_entropy(logits, TEMPERATURE, vocab)
            ((ref_lp * w_lp).sum() + ((ref_ent * w_h).sum() if with_entropy_grad else 0)).backward()

            new_h, new_w = hidden_sbh.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            lp, ent = head_logprobs_and_entropy(new_h.transpose(0, 1), new_w, target, TEMPERATURE, vocab, chunk)
            ((lp * w_lp).sum() + ((ent * w_h).sum() if with_entropy_grad else 0)).backward()
            assert new_h.grad is not None and ref_h.grad is not None and new_w.grad is not None
            assert ref_w.grad is not None
            diffs = {
                "logp": (lp - ref_lp).abs().max().item(),
                "entropy": (ent.detach() - ref_ent.detach()).abs().max().item(),
                "grad_hidden": (new_h.grad - ref_h.grad).abs().max().item(),
                "grad_weight": (new_w.grad - ref_w.grad).abs().max().item(),
            }
            assert lp.shape == target.shape and ent.shape == target.shape, where
            assert max(diffs.values()) <= ATOL, f"{where}: {diffs}"
            rows = torch.arange(rank * weight.shape[0], (rank + 1) * weight.shape[0])
            assert new_w.grad[rows >= vocab].abs().sum() == 0, f"{where}: padding rows got a gradient"
            print(f"ok {where} {diffs}", flush=True)
    # a wrong target (off by one token) must show: the comparison can fail
    hidden = hidden_sbh.transpose(0, 1)
    bad, _ = head_logprobs_and_entropy(hidden, weight, (target + 1) % vocab, TEMPERATURE, vocab)
    good = token_logprobs(hidden @ weight.t(), target, TEMPERATURE, vocab)
    assert (bad - good).abs().max().item() > 100 * ATOL, "a wrong target went unnoticed"


def _tiny_arch(tied: bool) -> Any:
    from learner.model.hf_config import HFArch

    return HFArch(model_type="qwen3", vocab_size=VOCAB, num_layers=2, hidden_size=64, ffn_hidden_size=128,
                  num_heads=4, num_kv_heads=2, head_dim=16, norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=64, tie_word_embeddings=tied, qk_norm=True, init_std=0.2)  # fmt: skip


def _model_parity(tp: int, tied: bool, dtype: str) -> None:
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    from learner.config import LearnerModelConfig
    from learner.logprobs import head_logprobs_and_entropy, logprobs_and_entropy
    from learner.model.build import build_model, unwrap
    from learner.model.head import enable_hidden_output, output_weight, returns_hidden

    where = f"model tp{tp} {'tied' if tied else 'untied'} {dtype}"
    model = build_model(_tiny_arch(tied), LearnerModelConfig(hf_path="x", tp_size=tp, dtype=dtype))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    ddp = DistributedDataParallel(config=get_model_config(model), ddp_config=ddp_config, module=model)
    ddp.train()
    b, s = 2, 12
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (b, s), generator=gen)
    positions = torch.arange(s).expand_as(ids)
    # a per-token mean, as the RL loss: gradients of O(1), where fp32 rounding stays below 1e-5
    w_lp, w_h = (torch.randn(b, s - 1, generator=gen) / (b * (s - 1)) for _ in range(2))

    def step(head: bool) -> tuple[Any, Any, dict[str, Any]]:
        out = ddp(ids, positions, None)
        if head:
            assert out.shape == (b, s, 64), f"{where}: hidden states {tuple(out.shape)}"
            lp, ent = head_logprobs_and_entropy(out[:, :-1], output_weight(ddp), ids[:, 1:], TEMPERATURE, VOCAB, CHUNK)
        else:
            lp, ent = logprobs_and_entropy(out[:, :-1], ids[:, 1:], TEMPERATURE, VOCAB, CHUNK)
        ((lp * w_lp).sum() + (ent * w_h).sum()).backward()
        ddp.finish_grad_sync()
        grads = {n: p.main_grad.detach().clone() for n, p in unwrap(ddp).named_parameters()}
        ddp.zero_grad_buffer()
        return lp.detach(), ent.detach(), grads

    ref_lp, ref_ent, ref_grads = step(head=False)
    assert not returns_hidden(ddp)
    enable_hidden_output(ddp)
    enable_hidden_output(ddp)  # idempotent
    assert returns_hidden(ddp)
    lp, ent, grads = step(head=True)
    assert sorted(grads) == sorted(ref_grads), where
    assert all(g.abs().sum() > 0 for g in grads.values()), f"{where}: a parameter got no gradient"
    if dtype == "fp32":
        diffs = {"logp": (lp - ref_lp).abs().max().item(), "entropy": (ent - ref_ent).abs().max().item()}
        diffs["grads"] = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
        diffs["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())
        assert max(v for k, v in diffs.items() if k != "grad_scale") <= ATOL, f"{where}: {diffs}"
    else:  # relative to each tensor's scale
        rel = {"logp": ((lp - ref_lp).abs().max() / ref_lp.abs().max()).item()}
        rel["grads"] = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n in grads)
        diffs = rel
        assert max(rel.values()) <= BF16_RTOL, f"{where}: {rel}"
    print(f"ok {where} {diffs}", flush=True)


def _worker() -> None:
    import torch.distributed as dist

    from learner.config import LearnerModelConfig
    from learner.parallel import destroy_parallel, init_parallel

    init_worker_process_group()
    for tp in TPS:
        init_parallel(LearnerModelConfig(hf_path="x", tp_size=tp))
        _function_parity(tp, dist.get_rank() % tp)
        for tied in (False, True):
            _model_parity(tp, tied, "fp32")
        if tp == 2:
            _model_parity(tp, False, "bf16")
        destroy_parallel(keep_process_group=True)
    destroy_parallel()


@pytest.fixture(scope="module")
def output() -> str:
    return run_torchrun(2, f"{__name__}:_worker", timeout_s=240)  # one launch (~6 s of imports) for both tests


def test_head_logprobs_match_the_logits_path(output: str) -> None:
    """Guards the chunked output layer: a hidden gradient not summed over TP shards, a weight gradient lost or
    counted once per chunk, padding rows of the vocab counted, a chunk boundary that drops or repeats rows, a wrong
    temperature factor or a hidden/target misalignment shows as a value or gradient off by more than 1e-5."""
    for tp in TPS:
        for chunk in (CHUNK, 4096):
            for grad in (True, False):
                assert f"ok function tp{tp} chunk {chunk} entropy grad {grad}" in output, output[-3000:]


def test_gpt_model_hidden_output_gives_the_same_logprobs_and_grads(output: str) -> None:
    """Guards the model hook: hidden states returned in the wrong layout ([s, b, h] against [b, s] targets), the
    wrong output weight (the tied embedding, the output layer's copy), a gradient that misses the weight or the
    decoder (DDP's main_grad), or the Float16Module's fp32 cast breaking the path, at TP2 and TP1."""
    for tp in TPS:
        for tied in ("untied", "tied"):
            assert f"ok model tp{tp} {tied} fp32" in output, output[-3000:]
    assert "ok model tp2 untied bf16" in output, output[-3000:]
