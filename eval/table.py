"""Plain-text tables of an eval summary and of a comparison (what the terminal shows)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

LABELS = {
    "avg_at_k": "avg@k",
    "pass_at_k": "pass@k",
    "accuracy_std_over_k": "accuracy std over k",
    "rubric_hit_rate": "rubric hit rate",
    "well_formed_rate": "well-formed rate",
    "finished_rate": "finished rate",
    "truncation_rate": "truncation rate",
    "mean_response_tokens": "mean response tokens",
    "num_questions": "questions",
    "k": "k",
}
_DATASET_COLUMNS = (
    "num_questions",
    "avg_at_k",
    "pass_at_k",
    "rubric_hit_rate",
    "well_formed_rate",
    "truncation_rate",
    "mean_response_tokens",
)


def fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return f"{value:+d}" if signed and not isinstance(value, bool) else str(value)
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:+.1f}" if signed else f"{value:.1f}"
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Collection[int] = (0,)) -> str:
    """Columns aligned: text columns (the first by default) to the left, numbers to the right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_summary(s: dict[str, Any]) -> str:
    k = s.get("k", "?")
    head = (
        f"model {s.get('model_path', '?')}  dataset {s.get('dataset_path', '?')}  judge {s.get('judge', '?')}\n"
        f"{s.get('num_questions')} questions x {k} samples in {s.get('timings', {}).get('eval_s', 0):.1f}s"
    )
    rows = [[LABELS[m].replace("@k", f"@{k}"), fmt(s.get(m))] for m in LABELS if m not in ("num_questions", "k")]
    out = [head, "", table(["metric", "value"], rows)]
    datasets = s.get("by_dataset", {})
    if len(datasets) > 1:
        drows = [[name, *(fmt(d.get(c)) for c in _DATASET_COLUMNS)] for name, d in datasets.items()]
        out += ["", table(["dataset", *(LABELS[c] for c in _DATASET_COLUMNS)], drows)]
    if s.get("num_prompts_too_long"):
        out += ["", f"{s['num_prompts_too_long']} prompts longer than the context counted wrong"]
    return "\n".join(out)


def _metric_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [LABELS.get(r["metric"], r["metric"]), fmt(r["a"]), fmt(r["b"]), fmt(r["delta"], signed=True)] for r in rows
    ]


def _question(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_compare(c: dict[str, Any], max_flips: int = 20) -> str:
    out = [f"A: {c['a']}", f"B: {c['b']}", "", table(["metric", "A", "B", "B - A"], _metric_rows(c["metrics"]))]
    if len(c["by_dataset"]) > 1:
        for name, rows in c["by_dataset"].items():
            out += ["", f"dataset {name}", table(["metric", "A", "B", "B - A"], _metric_rows(rows))]
    if c["settings_differ"]:
        out += [
            "",
            "settings that differ: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c["settings_differ"].items()),
        ]
    flips = c["flips"]
    if flips is None:
        out += ["", "no per-question flips: a run has no samples.jsonl"]
        return "\n".join(out)
    worse, better = flips["right_in_a_wrong_in_b"], flips["wrong_in_a_right_in_b"]
    out += [
        "",
        f"{flips['num_common']} questions in both runs ({flips['only_in_a']} only in A, {flips['only_in_b']} only "
        f"in B): {len(worse)} right in A and wrong in B, {len(better)} wrong in A and right in B",
    ]
    for title, flipped in (("right in A, wrong in B", worse), ("wrong in A, right in B", better)):
        if flipped:
            rows = [[f["id"], fmt(f["a"]), fmt(f["b"]), _question(f["question"])] for f in flipped[:max_flips]]
            out += [
                "",
                title + (f" (first {max_flips})" if len(flipped) > max_flips else ""),
                table(["id", "A", "B", "question"], rows, text_columns=(0, 3)),
            ]
    return "\n".join(out)
