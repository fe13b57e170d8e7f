"""Context parallelism: which tokens of a sequence a CP rank holds, and the K/V exchange its attention needs.

A sequence of length L (a multiple of 2 * cp) is cut into 2 * cp chunks; CP rank r holds chunks r and
2 * cp - 1 - r, in that order (the zig-zag split of Megatron's `get_batch_on_this_cp_rank` and Transformer
Engine's THD partitioning, so megatron's rotary embedding gives each held token its true position). Under a
causal mask an early chunk has little to attend to and a late one much: pairing them evens the work per rank.

Attention then needs every rank's keys and values: they are all-gathered over the CP group (the Llama 3
recipe: K/V are small under GQA) and put back in sequence order; the backward sums each rank's K/V gradient
back to its owner. Everything else in a layer is per token, so nothing else is exchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def zigzag_index(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (int64) of a `length`-token sequence held by `cp_rank`: chunk r, then chunk 2 * cp - 1 - r."""
    if cp_size == 1:
        return torch.arange(length)
    if length % (2 * cp_size):
        raise ValueError(f"a sequence of {length} tokens cannot be split into 2 x {cp_size} equal chunks")
    c = length // (2 * cp_size)
    first, second = cp_rank * c, (2 * cp_size - 1 - cp_rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])


def shard_positions(seq_lens: list[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices into a packed row of sequences (`seq_lens` tokens each, back to back) held by `cp_rank`."""
    parts, start = [], 0
    for n in seq_lens:
        parts.append(zigzag_index(n, cp_size, cp_rank) + start)
        start += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def restore_order(gathered: torch.Tensor) -> torch.Tensor:
    """`[cp, 2c, ...]` (every rank's zig-zag share of one sequence, in rank order) -> `[2 * cp * c, ...]` in order."""
    cp, c = gathered.shape[0], gathered.shape[1] // 2
    return torch.cat([gathered[j, :c] for j in range(cp)] + [gathered[j, c:] for j in reversed(range(cp))])


class _AllGather(torch.autograd.Function):
    """`[cp, *x.shape]`: x from every rank of `group`; the backward sums the gradients into the owner's share."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: reduce everything, keep this rank's share
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)].clone(), None


def all_gather_cp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Autograd-aware all-gather of `x` over the CP group: `[cp, *x.shape]` in rank order."""
    out: torch.Tensor = _AllGather.apply(x, group)  # type: ignore[no-untyped-call]  # torch leaves apply untyped
    return out
