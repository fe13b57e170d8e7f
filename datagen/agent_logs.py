"""The inputs of `longtrace data build` that come from a search agent: questions and its trajectories, as typed
records, checked line by line (a bad line is a DatasetError naming file:line). datagen/builder.py turns them into
rows; datagen/synth/ makes them for the synthetic worlds.

JSONL, one object per line; unknown keys are ignored:

* questions: `{"id": str, "question": str, "answer": str, "gold_entities": [str], "gold_doc_ids": [str],
  "aliases": [str] (optional, other accepted answers), "dataset_name": str (optional)}`.
  The gold entities (one per hop of the question's chain) become the rubrics.
* trajectories, any number per question, in any order:
  `{"question_id": str, "steps": [step, ...]}` where a step is one of
  `{"action": "search", "query": str, "results": [doc id, ...]}`,
  `{"action": "open", "doc_id": str}`,
  `{"action": "answer", "answer": str, "cited": [doc id, ...]}` (at most one, and last).
  A trajectory is used only if it ends with an answer that matches the gold answer or an alias after
  `norm` (datagen/text.py); one without an answer step is counted as unfinished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec

from datagen.dataset import DatasetError, iter_json_lines
from datagen.text import norm

_Record = TypeVar("_Record", "Question", "Trajectory")


class Question(msgspec.Struct, frozen=True):
    id: str
    question: str
    answer: str
    gold_entities: list[str]
    gold_doc_ids: list[str]
    aliases: list[str] = []
    dataset_name: str | None = None


class SearchStep(msgspec.Struct, frozen=True, tag_field="action", tag="search"):
    query: str
    results: list[str]


class OpenStep(msgspec.Struct, frozen=True, tag_field="action", tag="open"):
    doc_id: str


class AnswerStep(msgspec.Struct, frozen=True, tag_field="action", tag="answer"):
    answer: str
    cited: list[str] = []


Step = SearchStep | OpenStep | AnswerStep


class Trajectory(msgspec.Struct, frozen=True):
    question_id: str
    steps: list[Step]

    @property
    def final(self) -> AnswerStep | None:
        last = self.steps[-1] if self.steps else None
        return last if isinstance(last, AnswerStep) else None


def check_question(q: Question) -> None:
    """ValueError if a question cannot produce a valid row."""
    for key in ("id", "question", "answer"):
        if not getattr(q, key).strip():
            raise ValueError(f"{key}: empty")
    if not q.gold_doc_ids:
        raise ValueError("gold_doc_ids: empty (the context needs the gold documents)")
    for i, e in enumerate(q.gold_entities):
        if not norm(e):
            raise ValueError(f"gold_entities[{i}]: {e!r} normalises to an empty string")
    if q.dataset_name == "longrlvr":
        raise ValueError("dataset_name: 'longrlvr' marks chunk-id rubrics, not gold entities")


def check_trajectory(t: Trajectory) -> None:
    """ValueError if an answer step is not the last step."""
    for i, step in enumerate(t.steps[:-1]):
        if isinstance(step, AnswerStep):
            raise ValueError(f"steps[{i}]: an answer step must be the last step")


def _read(
    path: str | Path, kind: str, record: type[_Record], check: Callable[[_Record], None]
) -> Iterator[tuple[int, _Record]]:
    """(line, record) of each line of `path`; DatasetError (file:line) on one that is not a valid `kind`."""
    for lineno, obj in iter_json_lines(path):
        try:
            item = msgspec.convert(obj, record)
            check(item)
        except (msgspec.ValidationError, ValueError) as e:
            raise DatasetError(path, lineno, f"invalid {kind}: {e}") from None
        yield lineno, item


def load_questions(path: str | Path) -> tuple[list[Question], dict[str, int]]:
    """Questions in file order and the line of each id; DatasetError (file:line) on a bad or duplicate one."""
    out: list[Question] = []
    lines: dict[str, int] = {}
    for lineno, q in _read(path, "question", Question, check_question):
        if q.id in lines:
            raise DatasetError(path, lineno, f"duplicate question id {q.id!r} (first on line {lines[q.id]})")
        lines[q.id] = lineno
        out.append(q)
    return out, lines


def iter_trajectories(path: str | Path) -> Iterator[Trajectory]:
    """Stream trajectories; DatasetError (file:line) on a malformed one."""
    for _, t in _read(path, "trajectory", Trajectory, check_trajectory):
        yield t
