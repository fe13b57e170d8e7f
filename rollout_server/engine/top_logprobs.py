"""Top-k logprobs: SGLang's `top_logprobs_num` on /generate (`meta_info.output_top_logprobs`, and
`input_top_logprobs` for the prompt positions when `logprob_start_len >= 0`).

A row is the `top_logprobs_num` largest logprobs of one position, descending, with their token ids, under the same
convention as `output_token_logprobs` (sampling.py: log_softmax(logits / T), or without T under
`return_original_logprob`). SGLang takes them with one `topk` at the batch's largest k over the same logprobs it
returns for the sampled token (srt/layers/logits_processor.py `get_top_logprobs_raw`), and the tokenizer manager
turns each row into [logprob, token_id, text or None] triples (tokenizer_manager.py
`detokenize_top_logprobs_tokens`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_TOP_LOGPROBS_NUM = 256
"""A bound SGLang does not have: each output token carries k triples in every answer (and every streamed chunk), so a
k of the vocabulary's size would make a reply of vocab x tokens entries."""

TopRow = tuple[list[float], list[int]]
"""One position's top logprobs (descending) and their token ids."""


def top_rows(logprobs: torch.Tensor, nums: Sequence[int]) -> list[TopRow | None]:
    """Per row of `logprobs` [B, V], its `nums[i]` largest entries with their ids; None where nums[i] <= 0. One topk
    over only the rows that asked, at their largest k: nothing is computed when no row asked."""
    out: list[TopRow | None] = [None] * len(nums)
    rows = [i for i, k in enumerate(nums) if k > 0]
    if not rows:
        return out
    k = min(max(nums[i] for i in rows), logprobs.shape[-1])
    sub = logprobs if len(rows) == len(nums) else logprobs[rows]
    values, ids = sub.topk(k, dim=-1, sorted=True)
    value_rows: list[list[float]] = values.tolist()
    id_rows: list[list[int]] = ids.tolist()
    for j, i in enumerate(rows):
        out[i] = (value_rows[j][: nums[i]], id_rows[j][: nums[i]])
    return out


class TopLogprobsNumTooLarge(ValueError):
    """A `top_logprobs_num` above the vocabulary or MAX_TOP_LOGPROBS_NUM (a 400); `named` words it for the field a
    client sent (the OpenAI path's `logprobs` / `top_logprobs`)."""

    key = "top_logprobs_num"

    def __init__(self, value: int, vocab_size: int, name: str = key) -> None:
        self.value, self.vocab_size = value, vocab_size
        limit = min(vocab_size, MAX_TOP_LOGPROBS_NUM)
        super().__init__(
            f"{name} must be at most {limit} (the vocabulary has {vocab_size} tokens, the engine returns at most "
            f"{MAX_TOP_LOGPROBS_NUM} per position), got {value}"
        )

    def named(self, name: str) -> str:
        return str(TopLogprobsNumTooLarge(self.value, self.vocab_size, name))


def check_top_logprobs_num(value: Any, vocab_size: int) -> int:
    """One sequence's `top_logprobs_num`: an int (bool refused); <= 0 means none (SGLang's `top_logprobs_num > 0`
    test); above the vocabulary or MAX_TOP_LOGPROBS_NUM refused (TopLogprobsNumTooLarge)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"top_logprobs_num must be an integer, got {value!r}")
    if value > min(vocab_size, MAX_TOP_LOGPROBS_NUM):
        raise TopLogprobsNumTooLarge(value, vocab_size)
    return max(value, 0)


@dataclass
class TopLogprobs:
    """One request's top logprobs so far: `num` per position, a row per output token, and the prompt's rows once its
    prefill computed them (None before, or when the request asked for no prompt logprobs)."""

    num: int
    output: list[TopRow | None] = field(default_factory=list)
    input: list[TopRow | None] | None = None

    def copy(self) -> TopLogprobs:
        """A snapshot's copy (rows are never changed once made, only appended)."""
        return TopLogprobs(self.num, list(self.output), self.input)
