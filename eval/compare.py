"""Two eval runs side by side: metric deltas (B - A), overall and per dataset, the settings that differ, and
per-question flips.

Questions are matched by id. A question is right in a run when at least half of its samples are correct
(for k = 1: its one sample), so a flip is a question that crosses that line between the runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.aggregate import by_question, question_accuracy
from eval.outputs import load_run

METRICS = (
    "avg_at_k",
    "pass_at_k",
    "accuracy_std_over_k",
    "rubric_hit_rate",
    "well_formed_rate",
    "finished_rate",
    "truncation_rate",
    "mean_response_tokens",
    "num_questions",
    "k",
)
SETTINGS = (
    "dataset_path",
    "k",
    "temperature",
    "top_p",
    "top_k",
    "max_context_len",
    "max_response_len",
    "max_questions",
    "processor",
    "seed",
)
RIGHT = 0.5


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    samples: list[dict[str, Any]] | None


def load(path: str | Path) -> Run:
    summary, samples, run_dir = load_run(path)
    return Run(run_dir, summary, samples)


def _rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in METRICS:
        va, vb = a.get(name), b.get(name)
        delta = vb - va if isinstance(va, int | float) and isinstance(vb, int | float) else None
        rows.append({"metric": name, "a": va, "b": vb, "delta": delta})
    return rows


def _settings(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    ca, cb = a.get("config", {}), b.get("config", {})
    diff = {key: [ca.get(key), cb.get(key)] for key in SETTINGS if ca.get(key) != cb.get(key)}
    if a.get("model_path") != b.get("model_path"):
        diff["model_path"] = [a.get("model_path"), b.get("model_path")]
    if a.get("judge") != b.get("judge"):
        diff["judge"] = [a.get("judge"), b.get("judge")]
    return diff


def _flips(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    qa, qb = by_question(a), by_question(b)
    common = [qid for qid in qa if qid in qb]
    a_to_b: list[dict[str, Any]] = []
    b_to_a: list[dict[str, Any]] = []
    for qid in common:
        acc_a, acc_b = question_accuracy(qa[qid]), question_accuracy(qb[qid])
        entry = {"id": qid, "question": qa[qid][0].get("question", ""), "a": acc_a, "b": acc_b}
        if acc_a >= RIGHT > acc_b:
            a_to_b.append(entry)
        elif acc_b >= RIGHT > acc_a:
            b_to_a.append(entry)
    return {
        "num_common": len(common),
        "only_in_a": sum(qid not in qb for qid in qa),
        "only_in_b": sum(qid not in qa for qid in qb),
        "right_in_a_wrong_in_b": a_to_b,
        "wrong_in_a_right_in_b": b_to_a,
    }


def compare(a: Run, b: Run) -> dict[str, Any]:
    """The comparison as a JSON-able dict (table.format_compare renders it)."""
    sa, sb = a.summary, b.summary
    datasets = sorted(set(sa.get("by_dataset", {})) & set(sb.get("by_dataset", {})))
    return {
        "a": str(a.path),
        "b": str(b.path),
        "metrics": _rows(sa, sb),
        "by_dataset": {d: _rows(sa["by_dataset"][d], sb["by_dataset"][d]) for d in datasets},
        "settings_differ": _settings(sa, sb),
        "flips": _flips(a.samples, b.samples) if a.samples is not None and b.samples is not None else None,
    }
