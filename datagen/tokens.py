"""Token counting for context budgets and statistics: a Hugging Face tokenizer, or whitespace words.

The budget is counted on the text exactly as it goes into the user message (no special tokens, no chat
template). Whitespace counting is the exact token count of the tiny demo world's word-level tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from common.config import ConfigError

logger = logging.getLogger(__name__)


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class WhitespaceCounter:
    """Counts whitespace-separated words."""

    name = "whitespace"

    def count(self, text: str) -> int:
        return len(text.split())


class HFCounter:
    """Counts tokens with a Hugging Face tokenizer loaded offline from a local directory."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tok = tokenizer
        # The Rust tokenizer directly: no "sequence longer than model_max_length" warnings on 128K contexts.
        self._fast = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self.name = name

    def count(self, text: str) -> int:
        if self._fast is not None:
            return len(self._fast.encode(text, add_special_tokens=False).ids)
        return len(self._tok.encode(text, add_special_tokens=False))


def load_counter(tokenizer_dir: str | Path | None, flag: str = "--tokenizer") -> TokenCounter:
    """A counter for `tokenizer_dir` (AutoTokenizer, local files only), or whitespace words when None."""
    if tokenizer_dir is None:
        return WhitespaceCounter()
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise ConfigError(f"{flag}: no such directory {str(path)!r}")
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is asked for

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    logger.info("counting tokens with the tokenizer in %s (%s)", path, type(tok).__name__)
    return HFCounter(tok, name=str(path))
