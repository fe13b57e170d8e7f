"""LongTraceRL-format JSONL datasets: typed rows, a streaming loader and validator, and a writer.

One row per line (METHOD.md §1, "Released dataset format"):

    {"source": "longqa",
     "input_messages": [{"role": "user", "content": "<instruction>\\n\\nDocuments:\\n<section ...>...<question>"}],
     "label": "<short answer>",
     "metadata": {"extra_reward_info": {"question": str, "rubrics": [str, ...], "dataset_name": str, ...}, ...}}

Rules checked here: `input_messages` holds exactly one message, from the user, with non-empty content;
`label`, `question` and `dataset_name` are non-empty strings (the reward server raises a KeyError without
the last two); `rubrics` defaults to [] and each rubric must normalise to a non-empty string, because the
rubric reward's substring test would credit an empty one on every response. For `dataset_name ==
"longrlvr"` the rubrics are gold chunk ids (ints or digit strings). Unknown keys are kept (in `extra`,
`metadata_extra`, `reward_extra`) and written back unchanged, so a load/write round trip is lossless.

Reading streams line by line (constant memory); `.gz` files are read and written compressed.
Every error names the file and the line: `data.jsonl:17: metadata.extra_reward_info.question: missing`.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from datagen.text import norm

logger = logging.getLogger(__name__)

LONGRLVR = "longrlvr"


class DatasetError(ValueError):
    """A row (or the file) is invalid; the message starts with `file:line:`."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


class Message(msgspec.Struct, frozen=True):
    role: str
    content: str


class Row(msgspec.Struct, kw_only=True):
    """One LongTraceRL training or evaluation example."""

    source: str
    input_messages: list[Message]
    label: str
    question: str
    dataset_name: str
    rubrics: list[str | int] = []
    reward_extra: dict[str, Any] = {}
    """Keys of `metadata.extra_reward_info` besides question, rubrics and dataset_name (sent to the reward)."""
    metadata_extra: dict[str, Any] = {}
    """Keys of `metadata` besides `extra_reward_info` (e.g. the builder's provenance)."""
    extra: dict[str, Any] = {}
    """Top-level keys besides source, input_messages, label and metadata."""

    @property
    def prompt(self) -> str:
        """The user message: instruction, documents and question."""
        return self.input_messages[0].content

    @property
    def extra_reward_info(self) -> dict[str, Any]:
        """`metadata.extra_reward_info` as the reward server receives it."""
        return {"question": self.question, "rubrics": list(self.rubrics), "dataset_name": self.dataset_name} | dict(
            self.reward_extra
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this row, keys in the released order."""
        out: dict[str, Any] = {
            "source": self.source,
            "input_messages": [{"role": m.role, "content": m.content} for m in self.input_messages],
            "label": self.label,
            "metadata": {"extra_reward_info": self.extra_reward_info} | dict(self.metadata_extra),
        }
        return out | dict(self.extra)


def make_row(
    prompt: str,
    label: str,
    question: str,
    rubrics: list[str],
    dataset_name: str,
    *,
    source: str = "longqa",
    reward_extra: dict[str, Any] | None = None,
    metadata_extra: dict[str, Any] | None = None,
) -> Row:
    """A row with a single user message; checked with the same rules as a loaded row."""
    row = Row(
        source=source,
        input_messages=[Message(role="user", content=prompt)],
        label=label,
        question=question,
        dataset_name=dataset_name,
        rubrics=list(rubrics),
        reward_extra=dict(reward_extra or {}),
        metadata_extra=dict(metadata_extra or {}),
    )
    return parse_row(row.to_dict())


def _str(obj: dict[str, Any], key: str, where: str, *, required: bool = True, default: str = "") -> str:
    if key not in obj:
        if required:
            raise ValueError(f"{where}{key}: missing")
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}{key}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}{key}: empty")
    return value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _rubrics(value: Any, dataset_name: str, where: str) -> list[str | int]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    out: list[str | int] = []
    for i, r in enumerate(value):
        if dataset_name == LONGRLVR:
            # Gold chunk ids of the LongRLVR variant.
            if isinstance(r, bool) or not (isinstance(r, int) or (isinstance(r, str) and r.strip().isdigit())):
                raise ValueError(f"{where}[{i}]: a longrlvr rubric is a chunk id (int), got {r!r}")
        elif not isinstance(r, str):
            raise ValueError(f"{where}[{i}]: expected a string, got {type(r).__name__}")
        elif not norm(r):
            raise ValueError(f"{where}[{i}]: {r!r} normalises to an empty string (it would match every response)")
        out.append(r)
    return out


def parse_row(obj: Any) -> Row:
    """Validate one decoded JSON value and build its Row; ValueError names the offending key."""
    top = _obj(obj, "row")
    source = _str(top, "source", "")
    msgs = top.get("input_messages")
    if msgs is None:
        raise ValueError("input_messages: missing")
    if not isinstance(msgs, list):
        raise ValueError(f"input_messages: expected a list, got {type(msgs).__name__}")
    if len(msgs) != 1:
        raise ValueError(f"input_messages: expected exactly one (user) message, got {len(msgs)}")
    msg = _obj(msgs[0], "input_messages[0]")
    unknown = set(msg) - {"role", "content"}
    if unknown:
        raise ValueError(f"input_messages[0]: unknown keys {sorted(unknown)}")
    role = _str(msg, "role", "input_messages[0].")
    if role != "user":
        raise ValueError(f"input_messages[0].role: expected 'user', got {role!r}")
    content = _str(msg, "content", "input_messages[0].")
    label = _str(top, "label", "")
    if "metadata" not in top:
        raise ValueError("metadata: missing")
    meta = _obj(top["metadata"], "metadata")
    if "extra_reward_info" not in meta:
        raise ValueError("metadata.extra_reward_info: missing")
    info = _obj(meta["extra_reward_info"], "metadata.extra_reward_info")
    where = "metadata.extra_reward_info."
    question = _str(info, "question", where)
    dataset_name = _str(info, "dataset_name", where)
    rubrics = _rubrics(info.get("rubrics", []), dataset_name, where + "rubrics")
    return Row(
        source=source,
        input_messages=[Message(role=role, content=content)],
        label=label,
        question=question,
        dataset_name=dataset_name,
        rubrics=rubrics,
        reward_extra={k: v for k, v in info.items() if k not in ("question", "rubrics", "dataset_name")},
        metadata_extra={k: v for k, v in meta.items() if k != "extra_reward_info"},
        extra={k: v for k, v in top.items() if k not in ("source", "input_messages", "label", "metadata")},
    )


def _open_read(path: Path) -> io.BufferedIOBase:
    if not path.is_file():
        raise DatasetError(path, 0, "no such file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON value) for every non-blank line; DatasetError on invalid JSON."""
    p = Path(path)
    with _open_read(p) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, msgspec.json.decode(raw)
            except msgspec.DecodeError as e:
                raise DatasetError(p, lineno, f"invalid JSON: {e}") from None


def iter_rows(path: str | Path) -> Iterator[Row]:
    """Stream the rows of a dataset file; the first invalid row raises DatasetError (file:line: reason)."""
    for lineno, obj in iter_json_lines(path):
        try:
            yield parse_row(obj)
        except ValueError as e:
            raise DatasetError(path, lineno, str(e)) from None


@dataclass
class ValidationReport:
    path: str
    num_rows: int = 0
    """Valid rows."""
    num_errors: int = 0
    """Invalid lines (all of them, also those past max_errors)."""
    errors: list[DatasetError] = field(default_factory=list)
    """The first max_errors errors."""

    @property
    def ok(self) -> bool:
        return self.num_errors == 0 and self.num_rows > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "num_rows": self.num_rows,
            "num_errors": self.num_errors,
            "errors": [{"line": e.line, "reason": e.reason} for e in self.errors],
        }


def validate_file(path: str | Path, max_errors: int = 20) -> ValidationReport:
    """Check every line of a dataset file, collecting errors (up to max_errors) instead of stopping."""
    p = Path(path)
    report = ValidationReport(path=str(p))
    with _open_read(p) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                parse_row(msgspec.json.decode(raw))
            except msgspec.DecodeError as e:
                report.num_errors += 1
                if len(report.errors) < max_errors:
                    report.errors.append(DatasetError(p, lineno, f"invalid JSON: {e}"))
                continue
            except ValueError as e:
                report.num_errors += 1
                if len(report.errors) < max_errors:
                    report.errors.append(DatasetError(p, lineno, str(e)))
                continue
            report.num_rows += 1
    if report.num_rows == 0 and report.num_errors == 0:
        report.num_errors = 1
        report.errors.append(DatasetError(p, 0, "the file holds no rows"))
    return report


class DatasetWriter:
    """Writes rows as JSONL to a temporary file renamed onto `path` on a clean close (no half-written datasets)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        raw = self._tmp.open("wb")
        # mtime=0: identical bytes for identical rows, also when compressed.
        self._f: io.BufferedIOBase = (
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if self.path.suffix == ".gz" else raw
        )
        self._raw = raw
        self._enc = msgspec.json.Encoder()
        self.num_rows = 0

    def write(self, row: Row) -> None:
        self._f.write(self._enc.encode(row.to_dict()) + b"\n")
        self.num_rows += 1

    def write_dict(self, obj: dict[str, Any]) -> None:
        """Write any JSON object as one line (for the builder's and synth's auxiliary files)."""
        self._f.write(self._enc.encode(obj) + b"\n")
        self.num_rows += 1

    def close(self, commit: bool = True) -> None:
        if self._f is not self._raw:
            self._f.close()
        self._raw.close()
        if commit:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(commit=exc_type is None)


def write_rows(path: str | Path, rows: Iterable[Row]) -> int:
    """Write rows to `path` (atomically); returns how many."""
    with DatasetWriter(path) as w:
        for row in rows:
            w.write(row)
    return w.num_rows


def write_jsonl(path: str | Path, objs: Iterable[dict[str, Any]]) -> int:
    """Write JSON objects one per line (atomically); returns how many."""
    with DatasetWriter(path) as w:
        for obj in objs:
            w.write_dict(obj)
    return w.num_rows
