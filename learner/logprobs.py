"""Per-token log-probabilities of given tokens from TP-sharded logits: the quantity the RL loss needs.

Convention (shared with the rollout engine): the logprob of token i is log_softmax(logits / T)[token_i],
T the sampling temperature (1 for greedy), in fp32, over the real vocabulary, with no top-k/top-p
filtering; the logits at position j predict token j + 1. The vocab dimension stays sharded over TP.

Two paths. `token_logprobs`: megatron's vocab-parallel cross entropy (two all-reduces, a backward), which holds
several fp32 copies of the whole `[tokens, vocab / tp]` logits (the scaled input, the softmax it saves for the
backward). `logprobs_and_entropy` (the training step's): one pass over chunks of `chunk_tokens` rows that
gives the logprobs and, fused into the same pass, the entropy; it saves only two numbers per token for its
backward, which recomputes the softmax chunk by chunk. Never more than one chunk of fp32 `[rows, vocab / tp]`
is alive (at 64K tokens and a 152K vocabulary over TP4 the whole tensor is ~10 GB in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from learner import compat  # noqa: F401  (before megatron: CPU redirections when CUDA is absent)


def token_logprobs(logits: torch.Tensor, target: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """log p(target | logits / temperature), fp32, shape of `target`; differentiable w.r.t. `logits`.

    `logits` is this TP rank's vocab shard `[..., padded_vocab / tp]` (megatron's parallel_output); rows
    past `vocab_size` are padding and get probability 0. `target` holds global token ids.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use 1 for greedy), got {temperature}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not line up")
    scaled = logits.float() / temperature  # a fresh tensor: megatron's kernel works in place on its input
    shard = scaled.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard > vocab_size:
        padding = torch.arange(start, start + shard, device=scaled.device) >= vocab_size
        scaled = scaled.masked_fill(padding, float("-inf"))
    nll: torch.Tensor = vocab_parallel_cross_entropy(scaled, target)
    return -nll


def shifted_token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float, vocab_size: int
) -> torch.Tensor:
    """`[b, s - 1]` logprobs of input_ids[:, 1:] from logits[:, :-1] (position j predicts token j + 1)."""
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature, vocab_size)


CHUNK_TOKENS = 4096  # rows of fp32 [rows, vocab / tp] per chunk: 4096 x 38K (Qwen3 over TP4) is ~0.6 GB


def logprobs_and_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    vocab_size: int,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy of softmax(logits / T)) per position, fp32, shape of `target`; both differentiable
    w.r.t. `logits` (the entropy's gradient is computed only when it is used). Same inputs as `token_logprobs`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use 1 for greedy), got {temperature}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not line up")
    logp, entropy = _ChunkedLogprobEntropy.apply(  # type: ignore[no-untyped-call]  # torch leaves apply untyped
        logits, target, temperature, vocab_size, chunk_tokens
    )
    return logp, entropy


def _tp() -> tuple[Any, int, int]:
    group = parallel_state.get_tensor_model_parallel_group()
    return group, parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


class _Rows:
    """This TP rank's view of the logits as rows `[tokens, vocab / tp]`, and per chunk of rows what the forward and
    the backward both recompute: z = logits / T with the vocab's padding at -inf, and where each target sits."""

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, vocab_size: int, rank: int) -> None:
        self.shard = logits.shape[-1]
        self.start = rank * self.shard
        self.flat = logits.reshape(-1, self.shard)
        self.target = target.reshape(-1)
        self.real = torch.arange(self.start, self.start + self.shard, device=logits.device) < vocab_size

    def z(self, lo: int, hi: int, temperature: float) -> torch.Tensor:
        z = self.flat[lo:hi].float() / temperature
        return z.masked_fill_(~self.real, float("-inf"))

    def local_target(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets' columns in this shard, and which targets this shard holds."""
        local = self.target[lo:hi] - self.start
        return local, (local >= 0) & (local < self.shard)


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Forward: per chunk of rows, z = logits / T (padding rows of the vocab at -inf), lse = log sum exp z, the
    target's z (from the shard that holds it) and E_p[z], all-reduced over TP. Saves lse and E_p[z] per row.
    Backward, per chunk, with p = exp(z - lse) recomputed: d logp / dz = onehot - p, dH / dz = p (E_p[z] - z),
    times 1 / T; local to the shard (the reductions it needs are in the saved numbers)."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, temperature: float, vocab_size: int, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        group, tp, rank = _tp()
        rows = _Rows(logits, target, vocab_size, rank)
        lse = torch.empty(rows.flat.shape[0], dtype=torch.float32, device=logits.device)
        logp = torch.empty_like(lse)
        mean_z = torch.empty_like(lse)
        for lo in range(0, rows.flat.shape[0], chunk):
            z = rows.z(lo, lo + chunk, temperature)
            m = z.max(dim=-1).values
            if tp > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            z.sub_(m[:, None])  # z - m: exp cannot overflow; the max cancels out of every result below
            e = torch.exp(z)
            local, mine = rows.local_target(lo, lo + chunk)
            picked = z.gather(-1, local.clamp(0, rows.shard - 1)[:, None]).squeeze(-1) * mine
            # sum e, sum e * z (z := 0 on padding: 0 * -inf is NaN), the target's z: one all-reduce for all three
            sums = torch.stack([e.sum(-1), (e * z.masked_fill(~rows.real, 0.0)).sum(-1), picked])
            del e, z
            if tp > 1:
                dist.all_reduce(sums, group=group)
            log_sum = torch.log(sums[0])
            lse[lo : lo + chunk] = m + log_sum
            logp[lo : lo + chunk] = sums[2] - log_sum
            mean_z[lo : lo + chunk] = m + sums[1] / sums[0]  # E_p[z] in the unshifted scale
        ctx.save_for_backward(logits, target, lse, mean_z)
        ctx.args = (temperature, vocab_size, chunk)
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None: its backward term is skipped
        entropy = lse - mean_z
        return logp.view(target.shape), entropy.view(target.shape)

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None) -> tuple[Any, ...]:
        logits, target, lse, mean_z = ctx.saved_tensors
        temperature, vocab_size, chunk = ctx.args
        _, _, rank = _tp()
        rows = _Rows(logits, target, vocab_size, rank)
        g_lp = None if g_logp is None else g_logp.reshape(-1).float()
        g_h = None if g_entropy is None else g_entropy.reshape(-1).float()
        grad = torch.empty_like(rows.flat)
        for lo in range(0, rows.flat.shape[0], chunk):
            hi = lo + chunk
            z = rows.z(lo, hi, temperature)
            p = torch.exp(z - lse[lo:hi, None])  # 0 on padding
            g = torch.zeros_like(p)
            if g_lp is not None:
                g -= p * g_lp[lo:hi, None]
                local, mine = rows.local_target(lo, hi)
                held = torch.arange(local.shape[0], device=logits.device)[mine]
                g[held, local[mine]] += g_lp[lo:hi][mine]
            if g_h is not None:
                g += g_h[lo:hi, None] * p * (mean_z[lo:hi, None] - z.masked_fill(~rows.real, 0.0))
            grad[lo:hi] = (g / temperature).to(grad.dtype)
        return grad.view(logits.shape), None, None, None, None
