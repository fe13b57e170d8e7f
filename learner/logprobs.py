"""Per-token log-probabilities of given tokens from TP-sharded logits: the quantity the RL loss needs.

Convention (shared with the rollout engine): the logprob of token i is log_softmax(logits / T)[token_i],
T the sampling temperature (1 for greedy), in fp32, over the real vocabulary, with no top-k/top-p
filtering; the logits at position j predict token j + 1. The vocab dimension stays sharded over TP.

Three paths. `token_logprobs`: megatron's vocab-parallel cross entropy (two all-reduces, a backward), which holds
several fp32 copies of the whole `[tokens, vocab / tp]` logits (the scaled input, the softmax it saves for the
backward). `logprobs_and_entropy` (the training step's): one pass over chunks of `chunk_tokens` rows that
gives the logprobs and, fused into the same pass, the entropy; it saves only two numbers per token for its
backward, which recomputes the softmax chunk by chunk. Never more than one chunk of fp32 `[rows, vocab / tp]`
is alive (at 64K tokens and a 152K vocabulary over TP4 the whole tensor is ~10 GB in fp32), besides the logits.
`head_logprobs_and_entropy`: the same pass with the output layer inside it, from the hidden states and the
output weight, so that the logits never exist whole either (learner/model/head.py makes the model return them).
Both chunked passes share one implementation of the per-chunk statistics and gradient (`_chunk_stats`,
`_chunk_grad`).
"""

from __future__ import annotations

from collections.abc import Callable
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
    _check(temperature, chunk_tokens)
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not line up")
    logp, entropy = _ChunkedLogprobEntropy.apply(  # type: ignore[no-untyped-call]  # torch leaves apply untyped
        logits, target, temperature, vocab_size, chunk_tokens
    )
    return logp, entropy


def head_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    vocab_size: int,
    chunk_tokens: int = CHUNK_TOKENS,
    weight_grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_and_entropy(hidden @ weight.T, target, ...)` without ever holding those logits.

    `hidden` `[..., h]` with `hidden.shape[:-1] == target.shape`: what the output layer would consume (the final
    norm's output), the same full copy on every TP rank; a GPTModel after `learner.model.head.enable_hidden_output`
    returns it as `[b, s, h]` where it returned logits `[b, s, vocab / tp]`. `weight` `[padded_vocab / tp, h]`: this
    TP rank's shard of the output layer (`learner.model.head.output_weight`). Each chunk's logits are computed in the
    weight's dtype, as megatron's output layer does (a bf16 model's hidden comes back upcast to fp32 by Float16Module
    and is cast back, losslessly), then in fp32. Differentiable w.r.t. both: the hidden's gradient is all-reduced over
    TP (each vocab shard contributes a part: megatron's copy_to_tensor_model_parallel_region), the weight's goes back
    through autograd (so megatron DDP's grad hooks see it) and is summed over chunks in fp32.

    `weight_grad_into`: an fp32 tensor of the weight's shape (megatron DDP's `main_grad`) to which the weight's
    gradient is added chunk by chunk instead, autograd then getting none for it: no whole `[vocab / tp, h]` fp32
    gradient exists beside the buffer (megatron's gradient-accumulation fusion, on any device). Only where nothing
    waits for the weight's grad hook (DDP without overlap_grad_reduce).
    """
    _check(temperature, chunk_tokens)
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} do not line up")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [vocab / tp, {hidden.shape[-1]}]")
    if weight_grad_into is not None and (
        weight_grad_into.shape != weight.shape or weight_grad_into.dtype != torch.float32
    ):
        raise ValueError(f"weight_grad_into {tuple(weight_grad_into.shape)} is not fp32 {tuple(weight.shape)}")
    logp, entropy = _HeadLogprobEntropy.apply(  # type: ignore[no-untyped-call]  # torch leaves apply untyped
        hidden, weight, target, temperature, vocab_size, chunk_tokens, weight_grad_into
    )
    return logp, entropy


def _check(temperature: float, chunk_tokens: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use 1 for greedy), got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def _tp() -> tuple[Any, int]:
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


# ---------------------------------------------------------------- the per-chunk maths both passes share


class _Vocab:
    """This TP rank's columns `[start, start + shard)` of the padded vocabulary: which are real, where targets sit."""

    def __init__(self, shard: int, vocab_size: int, device: torch.device) -> None:
        self.shard = shard
        self.start = parallel_state.get_tensor_model_parallel_rank() * shard
        self.real = torch.arange(self.start, self.start + shard, device=device) < vocab_size

    def z(self, raw: torch.Tensor, temperature: float, owned: bool) -> torch.Tensor:
        """z = raw / T in fp32, padding at -inf. `owned`: raw is scratch that may be overwritten (a fresh matmul)."""
        z = raw.float().div_(temperature) if owned else raw.float() / temperature
        return z.masked_fill_(~self.real, float("-inf"))

    def local_target(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets' columns in this shard, and which targets this shard holds."""
        local = target - self.start
        return local, (local >= 0) & (local < self.shard)


ZOf = Callable[[int, int], torch.Tensor]  # rows [lo, hi) -> their fresh z (`_Vocab.z`), which the consumer overwrites


def _chunk_stats(
    z: torch.Tensor, target: torch.Tensor, vocab: _Vocab, group: Any, tp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse = log sum exp z, logp = z[target] - lse, E_p[z]) per row of one chunk, over the whole vocabulary (TP
    all-reduces: the max, then sum e, sum e z and the target's z together). Consumes z: works in its buffer."""
    m = z.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z.sub_(m[:, None])  # z - m: exp cannot overflow; the max cancels out of every result below
    local, mine = vocab.local_target(target)
    picked = torch.where(mine, z.gather(-1, local.clamp(0, vocab.shard - 1)[:, None]).squeeze(-1), 0.0)
    e = torch.exp(z)
    sum_e = e.sum(-1)
    sum_ez = z.masked_fill_(~vocab.real, 0.0).mul_(e).sum(-1)  # z := 0 on padding: 0 * -inf is NaN
    del e, z
    sums = torch.stack([sum_e, sum_ez, picked])
    if tp > 1:
        dist.all_reduce(sums, group=group)
    log_sum = torch.log(sums[0])
    return m + log_sum, sums[2] - log_sum, m + sums[1] / sums[0]  # E_p[z] back in the unshifted scale


def _chunk_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    vocab: _Vocab,
    lse: torch.Tensor,
    mean_z: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_h: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """d(sum g_lp logp + g_h H) / d logits of one chunk, fp32: with p = exp(z - lse), d logp / dz = onehot - p and
    dH / dz = p (E_p[z] - z), times 1 / T. Local to the shard: the TP sums it needs are in lse and E_p[z]. Consumes
    z (the result reuses its buffer): two chunks are alive with the entropy's gradient, one without."""
    if g_h is None:  # p alone: in z's buffer
        g = z.sub_(lse[:, None]).exp_()  # 0 on padding
        g = g.mul_(-g_lp[:, None]) if g_lp is not None else g.zero_()
    else:
        p = (z - lse[:, None]).exp_()
        g = z.masked_fill_(~vocab.real, 0.0).neg_().add_(mean_z[:, None]).mul_(p).mul_(g_h[:, None])
        if g_lp is not None:
            g.sub_(p.mul_(g_lp[:, None]))
        del p
    del z
    if g_lp is not None:
        local, mine = vocab.local_target(target)
        held = torch.arange(local.shape[0], device=g.device)[mine]
        g[held, local[mine]] += g_lp[mine]
    return g.div_(temperature)


def _forward_rows(
    z_of: ZOf, target: torch.Tensor, vocab: _Vocab, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, logp, E_p[z]) of every row `target` (flat) indexes, one chunk of rows at a time."""
    group, tp = _tp()
    n = target.shape[0]
    lse, logp, mean_z = (torch.empty(n, dtype=torch.float32, device=target.device) for _ in range(3))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        lse[lo:hi], logp[lo:hi], mean_z[lo:hi] = _chunk_stats(z_of(lo, hi), target[lo:hi], vocab, group, tp)
    return lse, logp, mean_z


def _backward_rows(
    z_of: ZOf,
    target: torch.Tensor,
    vocab: _Vocab,
    saved: tuple[torch.Tensor, torch.Tensor],
    grads: tuple[torch.Tensor | None, torch.Tensor | None],
    temperature: float,
    chunk: int,
    use: Callable[[int, int, torch.Tensor], None],
) -> None:
    """Hands `use(lo, hi, g)` each chunk's d loss / d logits (`_chunk_grad`; g is dropped when use returns)."""
    (lse, mean_z), (g_logp, g_entropy) = saved, grads
    g_lp = None if g_logp is None else g_logp.reshape(-1).float()
    g_h = None if g_entropy is None else g_entropy.reshape(-1).float()
    n = target.shape[0]
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        lp = None if g_lp is None else g_lp[lo:hi]
        h = None if g_h is None else g_h[lo:hi]
        use(lo, hi, _chunk_grad(z_of(lo, hi), target[lo:hi], vocab, lse[lo:hi], mean_z[lo:hi], lp, h, temperature))


# ---------------------------------------------------------------- the two autograd passes


def _logits_z(flat: torch.Tensor, vocab: _Vocab, temperature: float) -> ZOf:
    """z of rows [lo, hi) from the logits `[rows, vocab / tp]` (a new tensor: the logits stay untouched)."""
    return lambda lo, hi: vocab.z(flat[lo:hi], temperature, owned=False)


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """From logits: the forward saves lse and E_p[z] per row; the backward recomputes z per chunk from the logits."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, temperature: float, vocab_size: int, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = _Vocab(logits.shape[-1], vocab_size, logits.device)
        flat = logits.reshape(-1, vocab.shard)
        lse, logp, mean_z = _forward_rows(_logits_z(flat, vocab, temperature), target.reshape(-1), vocab, chunk)
        ctx.save_for_backward(logits, target, lse, mean_z)
        ctx.args = (temperature, vocab_size, chunk)
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None: its backward term is skipped
        return logp.view(target.shape), (lse - mean_z).view(target.shape)

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None) -> tuple[Any, ...]:
        logits, target, lse, mean_z = ctx.saved_tensors
        temperature, vocab_size, chunk = ctx.args
        vocab = _Vocab(logits.shape[-1], vocab_size, logits.device)
        flat = logits.reshape(-1, vocab.shard)
        grad = torch.empty_like(flat)

        def use(lo: int, hi: int, g: torch.Tensor) -> None:
            grad[lo:hi] = g

        z_of = _logits_z(flat, vocab, temperature)
        _backward_rows(z_of, target.reshape(-1), vocab, (lse, mean_z), (g_logp, g_entropy), temperature, chunk, use)
        return grad.view(logits.shape), None, None, None, None


def _head_z(rows: torch.Tensor, weight: torch.Tensor, vocab: _Vocab, temperature: float) -> ZOf:
    """z of rows [lo, hi) from the hidden states: one chunk of logits, in the weight's dtype (megatron's output layer's)."""
    return lambda lo, hi: vocab.z(rows[lo:hi].to(weight.dtype) @ weight.t(), temperature, owned=True)


class _HeadLogprobEntropy(torch.autograd.Function):
    """From (hidden, weight): the same forward per chunk of logits = hidden @ weight.T, saving lse and E_p[z]; the
    backward recomputes each chunk's logits, then grad_hidden = g @ weight (all-reduced over TP once at the end) and
    grad_weight += g.T @ hidden (fp32 sum over chunks)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        temperature: float,
        vocab_size: int,
        chunk: int,
        weight_grad_into: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = _Vocab(weight.shape[0], vocab_size, hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1])
        lse, logp, mean_z = _forward_rows(_head_z(rows, weight, vocab, temperature), target.reshape(-1), vocab, chunk)
        ctx.save_for_backward(hidden, weight, target, lse, mean_z)
        ctx.args = (temperature, vocab_size, chunk)
        ctx.weight_grad_into = weight_grad_into
        ctx.set_materialize_grads(False)
        return logp.view(target.shape), (lse - mean_z).view(target.shape)

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, target, lse, mean_z = ctx.saved_tensors
        temperature, vocab_size, chunk = ctx.args
        vocab = _Vocab(weight.shape[0], vocab_size, hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1])
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        # One fp32 [vocab / tp, h] sum (a bf16 running sum would round once per chunk): the caller's, or our own.
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.weight_grad_into
            if grad_weight is None:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

        def use(lo: int, hi: int, g: torch.Tensor) -> None:
            g = g.to(weight.dtype)  # what megatron's output layer's backward gets (its logits' grad, cast)
            if grad_rows is not None:
                grad_rows[lo:hi] = g @ weight
            if grad_weight is not None:
                h = rows[lo:hi].to(weight.dtype)
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight.add_(g.t() @ h)

        z_of = _head_z(rows, weight, vocab, temperature)
        _backward_rows(z_of, target.reshape(-1), vocab, (lse, mean_z), (g_logp, g_entropy), temperature, chunk, use)
        grad_hidden = None
        if grad_rows is not None:
            group, tp = _tp()
            if tp > 1:  # every rank's hidden is the same copy feeding its own vocab shard: the gradient is the sum
                dist.all_reduce(grad_rows, group=group)
            grad_hidden = grad_rows.view(hidden.shape)
        if grad_weight is None or ctx.weight_grad_into is not None:
            return grad_hidden, None, None, None, None, None, None
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None
