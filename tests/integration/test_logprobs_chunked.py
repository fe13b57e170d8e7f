"""The chunked, fused logprob + entropy pass (learner/logprobs.py `logprobs_and_entropy`) against the reference
path (megatron's vocab-parallel cross entropy and `vocab_parallel_entropy`): values and gradients at 1e-5, on 2
real torchrun gloo ranks at TP2 and TP1, with vocab padding, a ragged last chunk and a temperature."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.dist import init_worker_process_group, run_torchrun

ATOL = 1e-5


def _parity_worker(tmp: str) -> None:
    import torch
    import torch.distributed as dist

    from learner.config import LearnerModelConfig
    from learner.logprobs import logprobs_and_entropy, token_logprobs
    from learner.parallel import destroy_parallel, init_parallel
    from learner.train_step import vocab_parallel_entropy

    init_worker_process_group()
    vocab, padded, b, s, temperature = 37, 40, 3, 11, 0.7  # 3 padding rows of the vocab
    for tp in (2, 1):
        init_parallel(LearnerModelConfig(hf_path="x", tp_size=tp))
        rank = dist.get_rank() % tp if tp > 1 else 0
        gen = torch.Generator().manual_seed(0)
        full = torch.randn(b, s, padded, generator=gen) * 3
        target = torch.randint(0, vocab, (b, s), generator=gen)
        w_lp, w_h = torch.randn(b, s, generator=gen), torch.randn(b, s, generator=gen)
        shard = full.chunk(tp, dim=-1)[rank]
        for chunk in (5, 4096):  # several chunks with a ragged last one; one chunk
            for with_entropy_grad in (True, False):
                where = f"tp{tp} chunk {chunk} entropy grad {with_entropy_grad}"
                ref_in = shard.clone().requires_grad_(True)
                ref_lp = token_logprobs(ref_in, target, temperature, vocab)
                with torch.set_grad_enabled(with_entropy_grad):
                    ref_h = vocab_parallel_entropy(ref_in, temperature, vocab)
                ref_loss = (ref_lp * w_lp).sum() + ((ref_h * w_h).sum() if with_entropy_grad else 0)
                ref_loss.backward()

                new_in = shard.clone().requires_grad_(True)
                lp, h = logprobs_and_entropy(new_in, target, temperature, vocab, chunk_tokens=chunk)
                loss = (lp * w_lp).sum() + ((h * w_h).sum() if with_entropy_grad else 0)
                loss.backward()
                assert new_in.grad is not None and ref_in.grad is not None
                diffs = {
                    "logp": (lp - ref_lp).abs().max().item(),
                    "entropy": (h.detach() - ref_h.detach()).abs().max().item(),
                    "grad": (new_in.grad - ref_in.grad).abs().max().item(),
                }
                assert max(diffs.values()) <= ATOL, f"{where}: {diffs}"
                cols = torch.arange(rank * shard.shape[-1], (rank + 1) * shard.shape[-1])
                assert new_in.grad[..., cols >= vocab].abs().sum() == 0, f"{where}: padding rows got a gradient"
                print(f"ok {where} {diffs}", flush=True)
        # a wrong target (off by one token) must show: the comparison can fail
        lp_bad, _ = logprobs_and_entropy(shard, (target + 1) % vocab, temperature, vocab)
        lp_ok = token_logprobs(shard, target, temperature, vocab)
        assert (lp_bad - lp_ok).abs().max().item() > 100 * ATOL
        destroy_parallel(keep_process_group=True)
    destroy_parallel()


def test_chunked_logprobs_and_entropy_match_the_reference(tmp_path: Path) -> None:
    """Guards the memory-saving logprob pass: a wrong log-sum-exp over TP shards, a target taken from the wrong
    shard, padding rows of the vocab counted, a chunk boundary that drops or repeats rows, or a wrong backward
    (logprob or entropy term, temperature factor) shows as a value or gradient off by more than 1e-5."""
    output = run_torchrun(2, f"{__name__}:_parity_worker", {"tmp": str(tmp_path)}, timeout_s=240)
    for tp in (2, 1):
        for chunk in (5, 4096):
            for grad in (True, False):
                assert f"ok tp{tp} chunk {chunk} entropy grad {grad}" in output, output[-3000:]
