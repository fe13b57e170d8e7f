"""Summary metrics of an evaluation, from its sample records (SampleRecord.to_dict() or samples.jsonl lines).

Every rate is a mean over questions of the mean over that question's samples, so a question weighs the same
whatever its number of samples:
- avg@k: mean outcome (the paper's protocol, METHOD.md §4: avg@4);
- pass@k: fraction of questions with at least one correct sample among their k;
- accuracy_std_over_k: the sample standard deviation (ddof 1) of the k accuracies obtained by taking sample j
  of every question (j = 0..k-1), i.e. the spread over k single-sample runs; 0 for k = 1.
A sample is correct when its outcome is at least 0.5 (the judge answers 1 or 0).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CORRECT = 0.5

Record = Mapping[str, Any]


def correct(sample: Record) -> bool:
    return float(sample["outcome"]) >= CORRECT


def by_question(samples: Iterable[Record]) -> dict[str, list[Record]]:
    """Samples grouped by question id, questions in first-seen order, samples by sample_index."""
    grouped: dict[str, list[Record]] = {}
    for s in samples:
        grouped.setdefault(str(s["id"]), []).append(s)
    return {qid: sorted(ss, key=lambda s: int(s["sample_index"])) for qid, ss in grouped.items()}


def question_accuracy(samples: Sequence[Record]) -> float:
    """The fraction of a question's samples that are correct."""
    return sum(correct(s) for s in samples) / len(samples)


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def _question_mean(questions: Sequence[Sequence[Record]], value: Any) -> float:
    return _mean(_mean(float(value(s)) for s in qs) for qs in questions)


def metrics(questions: Sequence[Sequence[Record]]) -> dict[str, Any]:
    """The metrics of a set of questions (each a non-empty list of its samples)."""
    k = max((len(qs) for qs in questions), default=0)
    by_index = [_mean(float(correct(qs[j])) for qs in questions if len(qs) > j) for j in range(k)]
    return {
        "num_questions": len(questions),
        "num_samples": sum(len(qs) for qs in questions),
        "k": k,
        "avg_at_k": _mean(question_accuracy(qs) for qs in questions),
        "pass_at_k": _mean(float(any(correct(s) for s in qs)) for qs in questions),
        "accuracy_std_over_k": statistics.stdev(by_index) if k > 1 else 0.0,
        "accuracy_by_sample_index": by_index,
        "rubric_hit_rate": _question_mean(questions, lambda s: s["rubric"]),
        "well_formed_rate": _question_mean(questions, lambda s: s["well_formed"]),
        "finished_rate": _question_mean(questions, lambda s: s["finished"]),
        "truncation_rate": _question_mean(questions, lambda s: s["status"] == "truncated"),
        "mean_response_tokens": _question_mean(questions, lambda s: s["response_tokens"]),
        "num_prompts_too_long": sum(any(s.get("error") == "prompt_too_long" for s in qs) for qs in questions),
    }


def summarize(samples: Iterable[Record]) -> dict[str, Any]:
    """Overall metrics plus the same per `dataset_name` (under "by_dataset")."""
    questions = by_question(samples)
    if not questions:
        raise ValueError("no samples to summarize")
    per_dataset: dict[str, list[list[Record]]] = {}
    for qs in questions.values():
        per_dataset.setdefault(str(qs[0].get("dataset_name", "")), []).append(list(qs))
    out = metrics(list(questions.values()))
    out["by_dataset"] = {name: metrics(qs) for name, qs in sorted(per_dataset.items())}
    return out
