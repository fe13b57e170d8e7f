"""Sampling parameters (SGLang's names and defaults) and the batched sampler.

LOGPROB CONVENTION (the learner computes the same quantity, see learner/):

    output_token_logprobs[i] = log_softmax(logits_i / T)[token_i]

where `logits_i` are the model's logits for position i cast to float32, and T is the request's
temperature, with T = 1 when the request is greedy (temperature < 1e-6). It is taken BEFORE top-k,
top-p and min-p filtering: the filtered distribution is only used to draw the token. The same
convention applies to `input_token_logprobs` (prompt positions), with the request's T, and to the top-k rows
(`output_top_logprobs`, `input_top_logprobs`: the k largest of the same distribution, top_logprobs.py).

This is what recent SGLang returns by default (python/sglang/srt/layers/sampler.py): greedy batches
return `log_softmax(logits)`; sampling batches divide the logits by the temperature in place,
softmax them, and return `log(probs)` of that unfiltered distribution; SGLang maps a greedy request
to temperature 1 with top_k 1, so a greedy request in a mixed batch also gets T = 1. Differences:
SGLang computes `log(softmax(x))` where we compute `log_softmax(x)` (equal up to float rounding;
SGLang clamps -inf to the dtype's minimum), and SGLang's optional `SGLANG_RETURN_ORIGINAL_LOGPROB`
(logprobs without temperature) is our `return_original_logprob` config flag (default off, as in SGLang).
SGLang's RL on-policy mode computes the scaled logits in bfloat16; we always use float32.

Each request owns a `torch.Generator` (seeded by `sampling_seed` when given), so a seeded request
draws the same tokens whatever else is in the batch (up to floating-point batch variance of the
forward pass itself).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rollout_server.engine.top_logprobs import TopLogprobs, TopRow, top_rows

SAMPLING_EPS = 1e-6

# Known SGLang sampling parameters this engine does not implement: accepted only at their neutral value.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "min_new_tokens": 0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
    "stream_interval": None,
    "beam_width": None,
    "watermark": None,
}
_NO_VALUE = object()


class UnsupportedField(ValueError):
    """A field SGLang implements and this engine does not, set to other than its neutral value (a 400 naming it).
    The one rule of refusal for the native /generate path and the OpenAI path: `key` is the field's name where it
    was refused (sampling_params.frequency_penalty is `key` frequency_penalty), so the OpenAI layer can name the
    field its client sent instead."""

    def __init__(self, key: str, value: Any = _NO_VALUE, prefix: str = "") -> None:
        self.key, self.value = key, value
        shown = prefix + key if value is _NO_VALUE else f"{prefix}{key}={_short_repr(value)}"
        super().__init__(f"{shown} is not supported by the built-in engine")


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)  # a logit_bias of the whole vocabulary would otherwise fill the error
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_neutral(value: Any, neutral: Any) -> bool:
    """Null, the neutral value, or an empty value where the neutral is null (an empty logit_bias biases nothing;
    SGLang reads an empty json_schema, regex or ebnf as none)."""
    if value is None or value == neutral:
        return True
    return neutral is None and isinstance(value, (str, list, dict)) and not value


def refuse_unsupported(values: Mapping[str, Any], neutral: Mapping[str, Any], prefix: str = "") -> None:
    """Raise UnsupportedField for the first field of `neutral` that `values` sets to other than its neutral value."""
    for key, default in neutral.items():
        if not is_neutral(values.get(key), default):
            raise UnsupportedField(key, values[key], prefix)


@dataclass
class SamplingParams:
    """One request's sampling parameters, validated. Field names and defaults follow SGLang."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def effective_temperature(self) -> float:
        """The T of the logprob convention: 1 for greedy requests."""
        return 1.0 if self.greedy else self.temperature

    @property
    def needs_filter(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, vocab_size: int) -> SamplingParams:
        """Validate a request's `sampling_params` dict; raise ValueError naming the bad key."""
        raw = dict(raw or {})
        refuse_unsupported(raw, _UNSUPPORTED_DEFAULTS, "sampling_params.")
        for key in _UNSUPPORTED_DEFAULTS:
            raw.pop(key, None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown sampling_params: {', '.join(unknown)}")
        # SGLang treats null as "use the default".
        kwargs = {k: v for k, v in raw.items() if v is not None}
        if "max_new_tokens" in raw and raw["max_new_tokens"] is None:
            kwargs["max_new_tokens"] = -1  # resolved to the context budget by the engine
        stop = kwargs.get("stop", [])
        if not isinstance(stop, (str, list)):
            raise ValueError(f"sampling_params.stop must be a non-empty string or a list of them, got {stop!r}")
        kwargs["stop"] = [stop] if isinstance(stop, str) else stop
        if not isinstance(kwargs.get("stop_token_ids", []), list):
            raise ValueError(f"sampling_params.stop_token_ids must be a list of ints, got {kwargs['stop_token_ids']!r}")
        try:
            params = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - unknown keys are caught above
            raise ValueError(f"invalid sampling_params: {e}") from e
        params._verify(vocab_size)
        return params

    def _verify(self, vocab_size: int) -> None:
        def check_type(name: str, value: object, types: tuple[type, ...]) -> None:
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise ValueError(f"sampling_params.{name} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")

        for name in ("temperature", "top_p", "min_p"):
            check_type(name, getattr(self, name), (int, float))
        for name in ("max_new_tokens", "top_k", "n"):
            check_type(name, getattr(self, name), (int,))
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            check_type(name, getattr(self, name), (bool,))
        if self.sampling_seed is not None:
            check_type("sampling_seed", self.sampling_seed, (int,))
            # torch seeds are 64-bit; sample j of n uses seed + j
            if not -(2**63) <= self.sampling_seed < 2**63:
                raise ValueError(f"sampling_params.sampling_seed must be in [-2^63, 2^63), got {self.sampling_seed}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"sampling_params.stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(f"sampling_params.stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.max_new_tokens < 0 and self.max_new_tokens != -1:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size - 1}], got {bad}.")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own RNG: seeded by `sampling_seed`, else from fresh OS entropy."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    return gen


def token_logprobs(logits: torch.Tensor, temperatures: torch.Tensor, original: bool) -> torch.Tensor:
    """log_softmax(logits / T) in float32 ([B, V] logits, [B] temperatures); without T when `original`."""
    logits = logits.float()
    if not original:
        logits = logits / temperatures.unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1)


def prompt_logprobs(
    logits: torch.Tensor,
    input_ids: Sequence[int],
    params: SamplingParams,
    original: bool,
    start_len: int,
    top: TopLogprobs | None,
) -> list[float | None]:
    """`input_token_logprobs` values of prompt positions start_len.. (convention above) from the prompt's `logits`
    (row j predicts token j + 1), and with `top` its `input` rows (SGLang's `input_top_logprobs`); the first prompt
    token has neither (None, as SGLang's logprob_result_processor.py `_process_input_top_logprobs` starts its rows
    with [None])."""
    n = len(input_ids) - 1
    temps = torch.full((n,), params.effective_temperature, device=logits.device)
    logprobs = token_logprobs(logits[:n], temps, original)
    ids = torch.tensor(list(input_ids[1:]), dtype=torch.long, device=logprobs.device)
    values: list[float | None] = [None, *logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()]
    if top is not None:
        first = max(start_len - 1, 0)
        rows = top_rows(logprobs[first:], [top.num] * (logprobs.shape[0] - first))
        top.input = [None, *rows] if start_len == 0 else rows
    return values[start_len:]


def _filter_sorted(probs: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero what top-p, top-k and min-p exclude, on probabilities sorted descending; return (probs, ids)."""
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[-1]
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=probs.device)
    # top_k beyond the vocabulary keeps everything (and would overflow an int64 tensor)
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=probs.device)
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=probs.device)
    cumsum = probs_sort.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays).
    drop = (cumsum - probs_sort) > top_p.unsqueeze(-1)
    drop |= torch.arange(vocab, device=probs.device).unsqueeze(0) >= top_k.unsqueeze(-1)
    drop |= probs_sort < (probs_sort[:, :1] * min_p.unsqueeze(-1))
    drop[:, 0] = False  # the most likely token always survives
    return probs_sort.masked_fill(drop, 0.0), probs_idx


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    original_logprob: bool = False,
) -> tuple[list[int], list[float]]:
    """Draw one token per row of float32 `logits` [B, V]; return the tokens and their logprobs (convention above)."""
    tokens, chosen, _ = sample_with_top(logits, params, generators, original_logprob)
    return tokens, chosen


def sample_with_top(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    original_logprob: bool = False,
    top_logprobs_nums: Sequence[int] | None = None,
) -> tuple[list[int], list[float], list[TopRow | None]]:
    """`sample`, and per row its `top_logprobs_nums[i]` largest logprobs (the same convention) with their ids, None
    for a row that asked for none (top_logprobs.py; no top-k computed when no row asked)."""
    assert logits.shape[0] == len(params) == len(generators)
    temps = torch.tensor([p.effective_temperature for p in params], dtype=torch.float32, device=logits.device)
    logprobs = token_logprobs(logits, temps, original_logprob)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = [params[i] for i in rows]
        probs = torch.softmax(logits[rows] / temps[rows].unsqueeze(-1), dim=-1)
        ids = None
        if any(p.needs_filter for p in sub):
            probs, ids = _filter_sorted(probs, sub)
        # Inverse-CDF draw: one uniform per row from the row's own generator, then one batched search.
        # A zero-probability token never has cdf[i] > u * total >= cdf[i-1], so filtered tokens are never drawn.
        u = torch.stack([torch.rand((), generator=generators[i], device=logits.device) for i in rows])
        cdf = probs.cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_(max=probs.shape[-1] - 1)
        picked = ids.gather(-1, pick) if ids is not None else pick
        tokens[rows] = picked.squeeze(-1)
    token_list: list[int] = tokens.tolist()
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
    return token_list, chosen, top_rows(logprobs, top_logprobs_nums or [0] * len(params))
