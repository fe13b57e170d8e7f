"""`longtrace data stats`: one streaming pass over a dataset, summarised as one JSON object."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from datagen.dataset import LONGRLVR, iter_rows
from datagen.text import norm
from datagen.tokens import TokenCounter, WhitespaceCounter

_SECTION = re.compile(r"<section\b")


def summarize(values: list[int]) -> dict[str, float]:
    """min / mean / p50 / p90 / max / total of a list of counts (zeros for an empty list)."""
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p90": 0, "max": 0, "total": 0}
    s = sorted(values)

    def pct(q: float) -> int:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {
        "min": s[0],
        "mean": round(sum(s) / len(s), 2),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "max": s[-1],
        "total": sum(s),
    }


def dataset_stats(path: str | Path, counter: TokenCounter | None = None) -> dict[str, Any]:
    """Rows, context tokens of the user message, label lengths, rubric counts, documents per row.

    `rubric_in_context_rate` is the fraction of rubric entities that the rubric test finds in the row's own
    context: an entity absent from the documents cannot be grounded by the policy.
    """
    counter = counter or WhitespaceCounter()
    tokens: list[int] = []
    label_chars: list[int] = []
    rubric_counts: list[int] = []
    sections: list[int] = []
    sources: Counter[str] = Counter()
    datasets: Counter[str] = Counter()
    num_rubrics = num_rubrics_in_context = 0
    for row in iter_rows(path):
        prompt = row.prompt
        tokens.append(counter.count(prompt))
        label_chars.append(len(row.label))
        rubric_counts.append(len(row.rubrics))
        sections.append(len(_SECTION.findall(prompt)))
        sources[row.source] += 1
        datasets[row.dataset_name] += 1
        if row.dataset_name != LONGRLVR and row.rubrics:
            normed = norm(prompt)
            num_rubrics += len(row.rubrics)
            num_rubrics_in_context += sum(norm(str(r)) in normed for r in row.rubrics)
    return {
        "path": str(path),
        "num_rows": len(tokens),
        "tokenizer": counter.name,
        "context_tokens": summarize(tokens),
        "label_chars": summarize(label_chars),
        "rubrics_per_row": summarize(rubric_counts),
        "rubric_count_histogram": {str(k): v for k, v in sorted(Counter(rubric_counts).items())},
        "rows_without_rubrics": sum(1 for c in rubric_counts if c == 0),
        "rubric_in_context_rate": round(num_rubrics_in_context / num_rubrics, 4) if num_rubrics else None,
        "sections_per_row": summarize(sections),
        "sources": dict(sources.most_common()),
        "dataset_names": dict(datasets.most_common()),
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A short human-readable rendering of `dataset_stats`."""
    lines = [f"{stats['path']}: {stats['num_rows']} rows (tokens counted with {stats['tokenizer']})"]
    for key in ("context_tokens", "label_chars", "rubrics_per_row", "sections_per_row"):
        s = stats[key]
        lines.append(f"  {key:<17} min {s['min']}  mean {s['mean']}  p50 {s['p50']}  p90 {s['p90']}  max {s['max']}")
    lines.append(f"  rubric histogram  {stats['rubric_count_histogram']}")
    lines.append(f"  rubric_in_context_rate {stats['rubric_in_context_rate']}")
    lines.append(f"  sources {stats['sources']}  dataset_names {stats['dataset_names']}")
    return "\n".join(lines)
