"""A slot-based KV cache: one preallocated [slots, kv_heads, max_len, head_dim] tensor per layer for K and V.

A running sequence owns one slot for its whole life; its token at position p lives at [slot, :, p].
Slots are handed out lowest-first so the active batch stays dense at the start of the tensor. `copy_prefix` forks
the K/V of a slot's first tokens into another slot (prefix sharing: the scheduler's `_admit`).
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        # Zeros, not empty: masked positions get attention weight 0, and 0 * NaN garbage would still be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def alloc(self) -> int:
        assert self._free, "no free KV slot"
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, f"bad KV slot {slot}"
        heapq.heappush(self._free, slot)

    def copy_prefix(self, src: int, dst: int, num_tokens: int) -> None:
        """K/V of positions 0..num_tokens-1 of slot `src` into slot `dst`, every layer (a request that shares
        `src`'s first tokens then computes only the rest). Synchronous on the caller's stream: a later forward (or a
        reuse of `src` once freed) is ordered after it."""
        assert src != dst and 0 < num_tokens <= self.max_len, (src, dst, num_tokens)
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :num_tokens].copy_(k[src, :, :num_tokens])
            v[dst, :, :num_tokens].copy_(v[src, :, :num_tokens])

    def reset(self) -> None:
        """Forget every slot (flush_cache); the tensors keep their memory."""
        self._free = list(range(self.num_slots))
        heapq.heapify(self._free)
