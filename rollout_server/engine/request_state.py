"""A request's state on the scheduler thread (`Req`), the immutable `Snapshot` its sink gets, and the weight
version spans of a request that lived through weight updates (SGLang 0.5.23's `meta_info.weight_versions`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rollout_server.engine.sampling import SamplingParams
from rollout_server.engine.top_logprobs import TopLogprobs

FinishReason = dict[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """What a request has produced so far, as handed to its sink."""

    output_ids: list[int]
    output_logprobs: list[float]
    input_logprobs: list[float | None] | None
    finish: FinishReason | None
    num_retractions: int
    weight_version: str
    """The engine's weight version when this snapshot was taken (the weights of its last token)."""
    weight_versions: list[dict[str, Any]] | None = None
    """Once finished: {version, start, end} per run of output tokens generated under one version (SGLang's
    `meta_info.weight_versions`); None before (SGLang reports the spans on the final output only)."""
    top: TopLogprobs | None = None  # with top_logprobs_num > 0 only (top_logprobs.py)
    routed_experts: torch.Tensor | None = None
    """Once finished, with return_routed_experts: int32 [prompt + output tokens - 1, moe_layers, topk], the experts
    of every token the model ran on (SGLang's `meta_info.routed_experts`)."""
    cached_tokens: int = 0
    """Prompt tokens whose K/V were copied from another request's slot instead of computed (SGLang's
    `meta_info.cached_tokens`)."""


@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # resolved against the context length
    generator: torch.Generator
    sink: Callable[[Snapshot], None]
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top: TopLogprobs | None = None  # top_logprobs_num > 0 with logprobs asked for: its rows so far
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    finish: FinishReason | None = None
    slot: int | None = None
    kv_len: int = 0
    num_retractions: int = 0
    created_s: float = field(default_factory=time.monotonic)
    version_changes: list[tuple[str, int]] = field(default_factory=list)
    """(old version, output tokens so far) at each weight version change while this request had tokens."""
    return_routed_experts: bool = False
    routed: list[torch.Tensor] = field(default_factory=list)
    """With return_routed_experts: the experts of each forward's new tokens [n, moe_layers, topk] since prefill."""
    cached_tokens: int = 0
    """Tokens of this request's prefills copied from another slot (prefix sharing), not computed."""
    kv_epoch: int = -1
    """The scheduler's KV epoch when this request's K/V were made: only a slot of the current epoch is shared."""
    _ids: np.ndarray | None = field(default=None, repr=False)

    def ids_array(self) -> np.ndarray:
        """`input_ids` as an int64 array, made once (prefix matching compares long prompts many times)."""
        if self._ids is None:
            self._ids = np.asarray(self.input_ids, dtype=np.int64)
        return self._ids

    def token(self, i: int) -> int:
        """Token i of input_ids + output_ids."""
        n = len(self.input_ids)
        return self.input_ids[i] if i < n else self.output_ids[i - n]

    def snapshot(self, weight_version: str) -> Snapshot:
        spans = None
        if self.finish is not None:
            spans = weight_version_spans(self.version_changes, weight_version, len(self.output_ids))
        return Snapshot(
            list(self.output_ids),
            list(self.output_logprobs),
            self.input_logprobs,
            self.finish,
            self.num_retractions,
            weight_version,
            spans,
            self.top.copy() if self.top is not None else None,
            self._routed_experts() if self.finish is not None and self.return_routed_experts else None,
            self.cached_tokens,
        )

    def _routed_experts(self) -> torch.Tensor | None:
        if not self.routed:
            return None
        return torch.cat(self.routed)[: len(self.input_ids) + len(self.output_ids) - 1]


def weight_version_spans(changes: Sequence[tuple[str, int]], current: str, num_tokens: int) -> list[dict[str, Any]]:
    """SGLang's spans of one request: contiguous {version, start, end} over its `num_tokens` output tokens, one per
    run of a version (an empty request: one empty span of `current`). A change that came with no new token since the
    previous one names weights that generated nothing here: skipped."""
    spans: list[dict[str, Any]] = []
    for version, end in [*changes, (current, num_tokens)]:
        end = min(end, num_tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and spans[-1]["version"] == version:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans
