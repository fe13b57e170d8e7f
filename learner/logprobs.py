"""Per-token log-probabilities of given tokens from TP-sharded logits: the quantity the RL loss needs.

Convention (shared with the rollout engine): the logprob of token i is log_softmax(logits / T)[token_i],
T the sampling temperature (1 for greedy), in fp32, over the real vocabulary, with no top-k/top-p
filtering; the logits at position j predict token j + 1. The vocab dimension stays sharded over TP:
megatron's vocab-parallel cross entropy does the log-softmax with two all-reduces and has a backward.
"""

from __future__ import annotations

import torch
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
