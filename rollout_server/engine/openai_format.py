"""Response pieces of the OpenAI-compatible API in SGLang's shapes (srt/entrypoints/openai/protocol.py, utils.py,
usage_processor.py, srt/utils/weight_versions.py): logprobs, usage, the weight-version metadata, model cards."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cache
from typing import Any

Triple = Sequence[Any]  # one engine logprob entry: [logprob, token_id, token_text]


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable character -> the byte it stands for (the inverse of bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenText:
    """A token's text and raw bytes as SGLang's OpenAI layer reports them. A byte-level BPE token that is only a
    piece of a UTF-8 character decodes to U+FFFD; its true bytes come from the vocabulary entry instead."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"

    def raw_bytes(self, token_id: int) -> list[int] | None:
        """The token's bytes from its byte-level vocabulary entry; None for other tokenizers and special tokens."""
        if not self.byte_level:
            return None
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if not piece or any(ch not in decoder for ch in piece):
            return None
        return [decoder[ch] for ch in piece]

    def bytes_of(self, token_id: int, text: str | None) -> list[int]:
        raw = self.raw_bytes(token_id)
        return raw if raw is not None else list((text or "").encode("utf-8"))

    def lossless(self, token_id: int, text: str | None) -> str:
        """The display text, or for a fragment of a character its bytes as latin-1 (one char per byte): the legacy
        completions shape has no bytes field (utils.py `_lossless_token_text`)."""
        if text is not None and "\ufffd" not in text:
            return text
        raw = self.raw_bytes(token_id)
        if raw is None:
            return text or ""
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("latin-1")
        return text or ""


def completion_logprobs(names: TokenText, triples: Sequence[Triple], top: Sequence[Any] | None) -> dict[str, Any]:
    """The legacy `LogProbs` of /v1/completions (utils.py `to_openai_style_logprobs`): text offsets are not
    computed (-1, as SGLang); `top`: the engine's output_top_logprobs rows, absent when none were asked for."""
    return {
        "text_offset": [-1] * len(triples),
        "token_logprobs": [lp for lp, _, _ in triples],
        "tokens": [names.lossless(tid, text) for _, tid, text in triples],
        "top_logprobs": [
            None if row is None else {names.lossless(tid, text): lp for lp, tid, text in row} for row in top or []
        ],
    }


def chat_logprobs(names: TokenText, triples: Sequence[Triple], top: Sequence[Any] | None) -> dict[str, Any]:
    """`ChoiceLogprobs` of /v1/chat/completions (serving_chat.py `_build_token_logprobs_from_raw`); `top`: the
    engine's output_top_logprobs rows aligned with `triples` (each `TopLogprob` with its bytes), none when not asked."""
    rows = list(top or [])

    def top_of(i: int) -> list[dict[str, Any]]:
        row = rows[i] if i < len(rows) else None
        return [{"token": s or "", "bytes": names.bytes_of(t, s), "logprob": v} for v, t, s in row or []]

    return {
        "content": [
            {"token": text or "", "bytes": names.bytes_of(tid, text), "logprob": lp, "top_logprobs": top_of(i)}
            for i, (lp, tid, text) in enumerate(triples)
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """SGLang's `UsageInfo` (reasoning tokens are counted only by a reasoning parser: none here)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


def response_usage(outputs: Sequence[dict[str, Any]], n: int) -> dict[str, Any]:
    """Usage of a whole answer: each prompt's tokens once (the first of its n choices), every choice's completion."""
    prompt = sum(outputs[i]["meta_info"]["prompt_tokens"] for i in range(0, len(outputs), n))
    return usage(prompt, sum(o["meta_info"]["completion_tokens"] for o in outputs))


def stream_usage(prompt: dict[int, int], completion: dict[int, int], n: int) -> dict[str, Any]:
    """The final usage chunk's (usage_processor.py `calculate_streaming_usage`), nulls left out as SGLang does."""
    total = usage(sum(t for i, t in prompt.items() if i % n == 0), sum(completion.values()))
    return {k: v for k, v in total.items() if v is not None}


def weight_metadata(meta_info: dict[str, Any]) -> dict[str, Any]:
    """`metadata` of a non-streamed answer: the weight version of its first output, and the spans of output tokens
    per version where the engine reports them (weight_versions.py `build_endpoint_weight_version_metadata`)."""
    metadata = {"weight_version": meta_info["weight_version"]}
    if "weight_versions" in meta_info:
        metadata["weight_versions"] = meta_info["weight_versions"]
    return metadata


def model_card(name: str, max_model_len: int) -> dict[str, Any]:
    """SGLang's `ModelCard` of the served model."""
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "sglang",
        "root": name,
        "parent": None,
        "max_model_len": max_model_len,
    }
