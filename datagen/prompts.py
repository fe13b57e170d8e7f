"""Rows to prompts, as the engine sees them: random access to a LongTraceRL JSONL file and the chat template
applied to a row's messages. Shared by the learner's feeder, the evaluation and the experiments."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Protocol

import msgspec

from datagen.dataset import DatasetError, Row, parse_row


class PromptTokenizer(Protocol):
    """What the feeder needs of a HF tokenizer."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


class JsonlDataset:
    """Random access to the rows of a LongTraceRL JSONL file (plain: by byte offset; .gz: held in memory)."""

    def __init__(self, path: str | Path, flag: str = "--data.dataset_path") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{flag}: no such file {str(self.path)!r}")
        self._lines: list[bytes] | None = None
        self._offsets: list[tuple[int, int, int]] = []  # (line number, byte offset, length)
        if self.path.suffix == ".gz":
            with gzip.open(self.path, "rb") as f:
                self._lines = [raw for raw in f if raw.strip()]
        else:
            with self.path.open("rb") as f:
                offset = 0
                for lineno, raw in enumerate(f, start=1):
                    if raw.strip():
                        self._offsets.append((lineno, offset, len(raw)))
                    offset += len(raw)
        if len(self) == 0:
            raise ValueError(f"{flag}: {self.path} has no rows")

    def __len__(self) -> int:
        return len(self._lines) if self._lines is not None else len(self._offsets)

    def __getitem__(self, index: int) -> Row:
        if self._lines is not None:
            lineno, raw = index + 1, self._lines[index]
        else:
            lineno, offset, length = self._offsets[index]
            with self.path.open("rb") as f:
                f.seek(offset)
                raw = f.read(length)
        try:
            return parse_row(msgspec.json.decode(raw))
        except (msgspec.DecodeError, ValueError) as e:
            raise DatasetError(self.path, lineno, str(e)) from None


def prompt_ids(tokenizer: PromptTokenizer, row: Row) -> list[int]:
    """The chat template applied to the row's messages with the generation prompt, tokenized as the engine sees it."""
    messages = [{"role": m.role, "content": m.content} for m in row.input_messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)
