"""Request normalisation for the built-in engine: a /generate body (SGLang's `GenerateReqInput`) checked against
the model and the engine's limits, and expanded into one `Item` per sequence (prompts x n)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from rollout_server.engine.config import EngineConfig
from rollout_server.engine.protocol import GenerateReqInput
from rollout_server.engine.sampling import SamplingParams, UnsupportedField
from rollout_server.engine.top_logprobs import check_top_logprobs_num


@dataclass(frozen=True)
class Item:
    """One normalised generation request (a batch entry, or one of its n samples)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    return_logprob: bool
    logprob_start_len: int
    return_text_in_logprobs: bool
    seed: int | None
    created_s: float
    top_logprobs_num: int = 0
    """Top logprobs per position (SGLang's `top_logprobs_num`; returned with `return_logprob` only, as SGLang)."""
    return_routed_experts: bool = False


def check_text(text: str, name: str) -> str:
    """Refuse text that UTF-8 cannot encode (a lone surrogate from a JSON \\ud800 escape): the tokenizer
    would fail on it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode: {e.reason} at position {e.start}") from None
    return text


def _per_item(value: Any, batch: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * batch
    if isinstance(value, list):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {batch}")
        return [default if v is None else v for v in value]
    return [value] * batch


def prepare(
    obj: GenerateReqInput, tokenizer: Any, vocab_size: int, context_length: int, config: EngineConfig
) -> tuple[list[Item], bool]:
    """Validate and expand a /generate body into items (and whether the answer is one output, not a list); raise
    ValueError with SGLang-like messages."""
    for name in ("input_embeds", "image_data", "video_data", "audio_data", "lora_path", "token_ids_logprob"):
        if getattr(obj, name) is not None:
            raise UnsupportedField(name)
    if obj.return_hidden_states not in (False, None) and obj.return_hidden_states != []:
        raise UnsupportedField("return_hidden_states")
    if (obj.text is None) == (obj.input_ids is None):
        raise ValueError("Either text or input_ids should be provided.")
    prompts: list[list[int]]
    if obj.text is not None:
        single = isinstance(obj.text, str)
        texts = [obj.text] if isinstance(obj.text, str) else obj.text
        prompts = [list(tokenizer.encode(check_text(t, "text"))) for t in texts]
    else:
        assert obj.input_ids is not None
        single = not obj.input_ids or not isinstance(obj.input_ids[0], list)
        prompts = [list(obj.input_ids)] if single else [list(p) for p in obj.input_ids]  # type: ignore[arg-type]
    batch = len(prompts)
    if batch == 0:
        raise ValueError("The batch is empty.")
    raw_params = _per_item(obj.sampling_params, batch, "sampling_params", {})
    logprob = _per_item(obj.return_logprob, batch, "return_logprob", False)
    start_len = _per_item(obj.logprob_start_len, batch, "logprob_start_len", -1)
    routed = _per_item(obj.return_routed_experts, batch, "return_routed_experts", False)
    top_nums = [
        check_top_logprobs_num(k, vocab_size) for k in _per_item(obj.top_logprobs_num, batch, "top_logprobs_num", 0)
    ]
    if isinstance(obj.rid, list):
        rids = _per_item(obj.rid, batch, "rid", None)
    else:
        rids = [obj.rid if single else (f"{obj.rid}_{i}" if obj.rid else None) for i in range(batch)]
    all_params = [SamplingParams.from_dict(raw_params[i], vocab_size) for i in range(batch)]
    num_items = sum(p.n for p in all_params)
    if num_items > config.max_request_items:
        raise ValueError(
            f"the request asks for {num_items} sequences (prompts x n); the limit is "
            f"{config.max_request_items} (--max_request_items)"
        )
    if num_items > config.max_queued_requests:  # it could never be queued: refused, not "overloaded"
        raise ValueError(
            f"the request asks for {num_items} sequences (prompts x n); the engine queues at most "
            f"{config.max_queued_requests} (--max_queued_requests)"
        )
    now = time.monotonic()
    items: list[Item] = []
    for i, ids in enumerate(prompts):
        params = all_params[i]
        _check_prompt(ids, vocab_size, context_length)
        if params.max_new_tokens == -1:
            max_new = context_length - len(ids) - 1
        else:
            max_new = params.max_new_tokens
            if max_new + len(ids) >= context_length:
                raise ValueError(
                    f"Requested token count exceeds the model's maximum context length of {context_length} "
                    f"tokens. You requested a total of {max_new + len(ids)} tokens: {len(ids)} tokens from the "
                    f"input messages and {max_new} tokens for the completion. Please reduce the number of tokens "
                    "in the input messages or the completion to fit within the limit."
                )
        if not -1 <= start_len[i] < max(len(ids), 1):
            raise ValueError(f"logprob_start_len must be in [-1, {len(ids) - 1}], got {start_len[i]}")
        base_rid = rids[i] or uuid.uuid4().hex
        for j in range(params.n):
            seed = None if params.sampling_seed is None else params.sampling_seed + j
            rid = base_rid if params.n == 1 else f"{base_rid}_{j}"
            items.append(
                Item(
                    rid=rid,
                    input_ids=ids,
                    params=params,
                    max_new_tokens=max_new,
                    return_logprob=bool(logprob[i]),
                    logprob_start_len=int(start_len[i]),
                    return_text_in_logprobs=obj.return_text_in_logprobs,
                    seed=seed,
                    created_s=now,
                    top_logprobs_num=top_nums[i],
                    return_routed_experts=bool(routed[i]),
                )
            )
        if params.n > 1:
            single = False
    if len({it.rid for it in items}) != len(items):
        raise ValueError(f"Duplicate request IDs detected within the request: {[it.rid for it in items]}")
    return items, single


def _check_prompt(ids: list[int], vocab_size: int, context_length: int) -> None:
    if not ids:
        raise ValueError("The input is empty (0 tokens).")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"input_ids contain token ids outside [0, {vocab_size - 1}]: {bad[:5]}")
    if len(ids) >= context_length:
        raise ValueError(
            f"The input ({len(ids)} tokens) is longer than the model's context length ({context_length} tokens)."
        )
