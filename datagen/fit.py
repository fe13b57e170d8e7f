"""`longtrace data fit IN OUT --max_tokens N`: trim rows built by `longtrace data build` to a smaller token budget.

The released rows are ~128K tokens; a user with fewer GPUs trains at 32K or 64K. A row is trimmed by deleting
whole documents from its user message, never by cutting text:
- kept always: the instruction, the question, the gold documents, and every distractor that holds a rubric
  entity under the rubric reward's substring test (dropping those would change what the reward measures);
- dropped first: what the builder added last (METHOD.md §1: gold, then Tier-1, then Tier-2, then random fill),
  so random documents go first, then Tier-2, then Tier-1, each tier from its last-added document back;
- the order of the documents that stay is the row's order (the builder's shuffle).
Each trimmed row records what was dropped in `metadata.longtrace.fit` (and its `doc_ids`, `tiers` and
`context_tokens` describe the new message). A row whose kept documents alone exceed the budget cannot fit: it is
left out and named in the summary.

The documents are found in the message by the builder's provenance (`metadata.longtrace.doc_ids`, in message
order) and its default layout (`<section id="..." ...>` blocks joined by `doc_separator`); a row of another shape
is an error naming its line.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datagen.dataset import DatasetError, DatasetWriter, Message, Row, iter_json_lines, parse_row
from datagen.text import norm
from datagen.tokens import TokenCounter

DROP_ORDER = ("random", "tier2", "tier1")  # the builder adds gold, tier1, tier2, random: undo from the end
SECTION_END = "</section>"


@dataclass
class FitSummary:
    rows_in: int = 0
    rows_out: int = 0
    rows_trimmed: int = 0
    cannot_fit: list[dict[str, Any]] = field(default_factory=list)  # line, question id, kept tokens
    docs_dropped: Counter[str] = field(default_factory=Counter)  # by tier

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "docs_dropped": dict(self.docs_dropped)}


@dataclass
class _Context:
    head: str
    sections: list[str]  # one per document, in message order, without the separator
    tail: str
    sep: str

    def render(self, keep: list[bool]) -> str:
        return self.head + self.sep.join(s for s, k in zip(self.sections, keep, strict=True) if k) + self.tail


def split_context(prompt: str, doc_ids: list[str], sep: str) -> _Context:
    """The message cut into head, one section per document (by the builder's `doc_ids`), tail; ValueError when it
    does not have the builder's layout."""
    starts = []
    pos = 0
    for doc_id in doc_ids:
        at = prompt.find(f'<section id="{html.escape(doc_id, quote=True)}"', pos)
        if at < 0:
            raise ValueError(f"document {doc_id!r} of metadata.longtrace.doc_ids is not in the message (in order)")
        starts.append(at)
        pos = at + 1
    if not starts:
        return _Context(prompt, [], "", sep)
    end = prompt.rfind(SECTION_END)
    if end < starts[-1]:
        raise ValueError(f"no {SECTION_END} after the last document")
    end += len(SECTION_END)
    sections = []
    for i, start in enumerate(starts):
        stop = starts[i + 1] - len(sep) if i + 1 < len(starts) else end
        if i + 1 < len(starts) and prompt[stop : starts[i + 1]] != sep:
            raise ValueError(f"documents are not joined by {sep!r} (--doc_separator)")
        sections.append(prompt[start:stop])
    return _Context(prompt[: starts[0]], sections, prompt[end:], sep)


def fit_row(row: Row, max_tokens: int, counter: TokenCounter, sep: str = "\n") -> tuple[Row | None, dict[str, Any]]:
    """The row trimmed to `max_tokens` (unchanged if it fits), or None when its kept documents alone exceed it;
    and what was done (`dropped` by tier, token counts)."""
    meta = row.metadata_extra.get("longtrace")
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("doc_ids"), list)
        or not isinstance(meta.get("tiers"), dict)
    ):
        raise ValueError("no metadata.longtrace.doc_ids / tiers: not a row of `longtrace data build`")
    doc_ids: list[str] = list(meta["doc_ids"])
    tiers: dict[str, list[str]] = {t: list(ids) for t, ids in meta["tiers"].items()}
    tokens = counter.count(row.prompt)
    info: dict[str, Any] = {"context_tokens_before": tokens, "max_tokens": max_tokens, "dropped": {}}
    if tokens <= max_tokens:
        return row, info
    ctx = split_context(row.prompt, doc_ids, sep)
    index = {d: i for i, d in enumerate(doc_ids)}
    entities = [norm(str(e)) for e in row.rubrics if norm(str(e))]
    keep = [True] * len(doc_ids)
    candidates = [
        (tier, d)
        for tier in DROP_ORDER
        for d in reversed(tiers.get(tier, []))
        if d in index and not any(e in norm(ctx.sections[index[d]]) for e in entities)
    ]
    # Estimate with each section's own count, then check the rendered message (tokenizers merge across pieces).
    estimate = tokens
    dropped: dict[str, list[str]] = {}
    for tier, d in candidates:
        if estimate <= max_tokens:
            tokens = counter.count(ctx.render(keep))
            if tokens <= max_tokens:
                break
            estimate = tokens
        keep[index[d]] = False
        dropped.setdefault(tier, []).append(d)
        estimate -= counter.count(ctx.sections[index[d]] + sep)
    else:
        tokens = counter.count(ctx.render(keep))
    info |= {"dropped": dropped, "context_tokens": tokens}
    if tokens > max_tokens:
        return None, info
    prompt = ctx.render(keep)
    gone = {d for ids in dropped.values() for d in ids}
    new_meta = meta | {
        "doc_ids": [d for d in doc_ids if d not in gone],
        "tiers": {t: [d for d in ids if d not in gone] for t, ids in tiers.items()},
        "context_tokens": tokens,
        "fit": {
            "max_tokens": max_tokens,
            "tokenizer": counter.name,
            "context_tokens_before": info["context_tokens_before"],
            "dropped": dropped,
        },  # fmt: skip
    }
    messages = [Message(role=row.input_messages[0].role, content=prompt), *row.input_messages[1:]]
    fitted = Row(
        source=row.source,
        input_messages=messages,
        label=row.label,
        question=row.question,
        dataset_name=row.dataset_name,
        rubrics=list(row.rubrics),
        reward_extra=dict(row.reward_extra),
        metadata_extra=row.metadata_extra | {"longtrace": new_meta},
        extra=dict(row.extra),
    )
    return fitted, info


def fit_file(src: str | Path, dst: str | Path, max_tokens: int, counter: TokenCounter, sep: str = "\n") -> FitSummary:
    """Fit every row of `src` into `dst` (written only if complete); rows that cannot fit are left out, named."""
    summary = FitSummary()
    with DatasetWriter(dst) as out:
        for line, obj in tqdm(iter_json_lines(src), desc="fit", unit="row", disable=None, leave=False):  # TTY only
            summary.rows_in += 1
            try:
                row = parse_row(obj)
                fitted, info = fit_row(row, max_tokens, counter, sep)
            except ValueError as e:
                raise DatasetError(src, line, str(e)) from None
            if fitted is None:
                qid = row.metadata_extra.get("longtrace", {}).get("question_id", "")
                summary.cannot_fit.append({"line": line, "question_id": qid, "kept_tokens": info["context_tokens"]})
                continue
            if info["dropped"]:
                summary.rows_trimmed += 1
                for tier, ids in info["dropped"].items():
                    summary.docs_dropped[tier] += len(ids)
            out.write(fitted)
            summary.rows_out += 1
    return summary
