"""Prefix sharing: a request whose tokens start like those of a request holding a KV slot copies that slot's K/V
and computes only the rest (what SGLang's radix cache and in-batch prefix caching give a group's n samples of one
prompt: the prompt prefilled once, `meta_info.cached_tokens` = the tokens not recomputed).

The slot cache keeps no K/V of finished requests, so the only sources are requests that hold a slot now, on the
scheduler thread: the running ones, read and copied at admission before anything can free them (a finished or
aborted request left `running` with its slot, so its stale K/V are never read). The match is the longest common
prefix of the tokens (prompt + output so far, as a retracted or resumed request re-prefills them) with a source's
tokens whose K/V it holds (`kv_len`), and always leaves the last token to compute (its logits are the first
sample's, as SGLang recomputes the last token). Not shared: requests that want prompt logprobs (every prompt token's
logits), and K/V of another epoch (made before a weight change or a pause: `Scheduler.kv_epoch`). A MoE request
that returns its routed experts shares only with a source that recorded them (the copied tokens' rows come along).

Several waiting requests with one prompt and no running source: the first is prefilled alone and the others wait
one step (`DEFER`) to copy from it, provided at least half of their tokens are shared.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import numpy as np

from rollout_server.engine.request_state import Req

DEFER: Final = "defer"
"""`pick_source`'s answer for a request that should wait for a request of this prefill batch to hold its K/V."""


def num_tokens(r: Req) -> int:
    return len(r.input_ids) + len(r.output_ids)


def shared_len(r: Req, src: Req, src_len: int) -> int:
    """Length of the common prefix of r's tokens and the first `src_len` tokens of src (prompt + output)."""
    a, b = r.ids_array(), src.ids_array()
    n = min(len(a), len(b), src_len)
    if n == 0 or a[0] != b[0]:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        return int(diff[0])
    end = min(num_tokens(r), src_len)  # one prompt is a prefix of the other: go on through the outputs
    while n < end and r.token(n) == src.token(n):
        n += 1
    return n


def wants_prompt_logprobs(r: Req) -> bool:
    return r.return_logprob and r.logprob_start_len >= 0 and r.input_logprobs is None


def pick_source(r: Req, running: Iterable[Req], batch: Iterable[Req], epoch: int) -> tuple[Req | None, int] | str:
    """The running request to copy r's prefix from and how many tokens (None, 0: none), or DEFER when a request
    admitted in this batch shares more of r (at least half of it) than any running one."""
    if wants_prompt_logprobs(r):
        return None, 0
    limit = num_tokens(r) - 1
    best: Req | None = None
    best_len = 0
    for s in running:
        if s.slot is None or s.finish is not None or s.kv_epoch != epoch or not _routing_ok(r, s):
            continue
        k = min(shared_len(r, s, s.kv_len), limit)
        if k > best_len:
            best, best_len = s, k
    for s in batch:
        if _routing_ok(r, s):
            k = min(shared_len(r, s, num_tokens(s)), limit)
            if k > best_len and 2 * k >= num_tokens(r):
                return DEFER
    return best, best_len


def _routing_ok(r: Req, src: Req) -> bool:
    return not r.return_routed_experts or src.return_routed_experts
