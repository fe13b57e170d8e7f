"""The ablation's summary (OUT/ablation.json): per-variant figures with their spread over seeds, the accuracy
curves, and the paper's directions checked with the z of each difference. Pure functions of the per-run results
that experiments/ablate.py collects.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.ablate import Plan

PAPER: dict[str, Any] = {
    "source": "LongTraceRL ablations, Qwen3-4B, average score (docs: ../shared/docs/METHOD.md)",
    "outcome_only": 53.7,
    "positive_only": 59.0,
    "both": 57.1,
    "eta": {"0.1": 58.3, "0.3": 59.0, "0.5": 57.1},
}


def mean(xs: list[float]) -> float:
    """The mean; NaN for no values (a missing figure, not a zero)."""
    return sum(xs) / len(xs) if xs else math.nan


def spread(values: dict[int, float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one seed) and the per-seed values."""
    xs = list(values.values())
    return {
        "mean": mean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs) if xs else math.nan,
        "max": max(xs) if xs else math.nan,
        "per_seed": {str(s): x for s, x in values.items()},
    }


FINAL_KEYS = (
    "accuracy",
    "rubric_hit_rate",
    "well_formed_rate",
    "ill_formed_rate",
    "unfinished_rate",
    "entities_named_mean",
    "listing_rate",
    "hacking_rate",
    "rubric_without_outcome_rate",
)


def summarize(
    plan: Plan, sft: dict[int, dict[str, Any]], runs: dict[tuple[int, str], dict[str, Any]]
) -> dict[str, Any]:
    cfg = plan.cfg
    variants: dict[str, Any] = {}
    for v in plan.variants:
        # Per seed: step -> indicators, with step 0 the shared SFT model.
        per_seed = {s: {0: sft[s]["indicators"], **runs[(s, v.name)]["curve"]} for s in cfg.seeds}
        last = {s: max(c) for s, c in per_seed.items()}
        steps = [k for k in plan.eval_steps if all(k in c for c in per_seed.values())]
        curves = {}
        for key in ("accuracy", "rubric_hit_rate", "hacking_rate", "ill_formed_rate"):
            points = [spread({s: per_seed[s][k][key] for s in cfg.seeds}) for k in steps]
            curves[key] = {
                "mean": [p["mean"] for p in points],
                "std": [p["std"] for p in points],
                "per_seed": {str(s): [per_seed[s][k][key] for k in steps] for s in cfg.seeds},
            }
        entry: dict[str, Any] = {
            "eta": v.eta,
            "combination": v.combination,
            "final_step": {str(s): last[s] for s in cfg.seeds},
            "curve_steps": steps,
            "curves": curves,
        }
        for key in FINAL_KEYS:
            entry[key] = spread({s: per_seed[s][last[s]][key] for s in cfg.seeds})
        entry["final_accuracy"] = entry["accuracy"]
        # Held-out samples behind each final rate, over all seeds: the scale of its sampling noise (checks' z).
        entry["num_samples"] = int(sum(per_seed[s][last[s]].get("num_samples", 0) for s in cfg.seeds))
        # Mean accuracy over the RL curve (steps > 0): separates "learns faster" from "ends higher".
        entry["accuracy_curve_mean"] = spread(
            {s: mean([per_seed[s][k]["accuracy"] for k in steps if k > 0]) for s in cfg.seeds}
        )
        entry["gain_over_sft"] = spread(
            {s: per_seed[s][last[s]]["accuracy"] - per_seed[s][0]["accuracy"] for s in cfg.seeds}
        )
        entry["system_eval_accuracy"] = spread(
            {s: float(runs[(s, v.name)]["system_eval"].get("accuracy", math.nan)) for s in cfg.seeds}
        )
        entry["train_last10"] = {str(s): runs[(s, v.name)]["train"] for s in cfg.seeds}
        entry["wall_s"] = {str(s): round(runs[(s, v.name)]["wall_s"], 1) for s in cfg.seeds}
        variants[v.name] = entry
    return {
        "bench": "ablation",
        "seeds": cfg.seeds,
        "rl_steps": plan.rl_steps,
        "eval_steps": plan.eval_steps,
        "held_out": "greedy per-sample evaluation of the HF exports (experiments/ablate_samples.py); system_eval_accuracy "
        "is the launcher's engine evaluation after the RL phase",
        "hacking_definition": f"wrong samples naming >= {cfg.hacking.listing_min_entities} distinct entities "
        f"(/{cfg.hacking.entity_pattern}/) in the answer, or in the whole response when it is not well-formed",
        "sft": {
            str(s): {k: sft[s][k] for k in ("wall_s", "system_eval")} | {"accuracy": sft[s]["indicators"]["accuracy"]}
            for s in cfg.seeds
        },
        "variants": variants,
        "checks": direction_checks(variants),
        "paper": PAPER,
        "ratio": _ratio(variants),
    }


def _ratio(variants: dict[str, Any]) -> float:
    """Final held-out accuracy of positive_only over outcome_only (the bench's headline ratio)."""
    if "positive_only" not in variants or "outcome_only" not in variants:
        return math.nan
    a, b = variants["positive_only"]["accuracy"]["mean"], variants["outcome_only"]["accuracy"]["mean"]
    return a / b if b > 0 else math.nan


def difference_z(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    """z of the difference of two variants' pooled final rates `key` (two-proportion test over all seeds' held-out
    samples): |z| < 2 means the difference is within the sampling noise of the evaluation alone (seed-to-seed
    variation of training comes on top of it)."""
    n1, n2 = a.get("num_samples", 0), b.get("num_samples", 0)
    if not n1 or not n2:
        return math.nan
    p1, p2 = a[key]["mean"], b[key]["mean"]
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (p1 - p2) / se if se > 0 else 0.0


def direction_checks(variants: dict[str, Any]) -> dict[str, Any]:
    """The paper's directions on this task (None when a variant is missing): positive-only >= outcome-only in
    final held-out accuracy, and rubric-on-every-sample hacks more than positive-only. Each difference comes with
    its z (`difference_z`): a direction that holds at |z| < 2 is not evidence either way."""
    out: dict[str, Any] = {}

    def compare(name: str, a: str, b: str, key: str) -> None:
        """`name`: variant a's mean final `key` minus variant b's; `name_z`: its z."""
        out[name] = variants[a][key]["mean"] - variants[b][key]["mean"]
        out[f"{name}_z"] = difference_z(variants[a], variants[b], key)

    if "positive_only" in variants and "outcome_only" in variants:
        p, o = variants["positive_only"]["accuracy"], variants["outcome_only"]["accuracy"]
        out["positive_only_ge_outcome_only"] = p["mean"] >= o["mean"]
        compare("positive_only_minus_outcome_only", "positive_only", "outcome_only", "accuracy")
        out["seeds_positive_only_ge_outcome_only"] = sum(p["per_seed"][s] >= o["per_seed"][s] for s in p["per_seed"])
        out["paper_positive_only_minus_outcome_only"] = PAPER["positive_only"] - PAPER["outcome_only"]
    else:
        out["positive_only_ge_outcome_only"] = None
    if "both" in variants and "positive_only" in variants:
        b, p = variants["both"]["hacking_rate"], variants["positive_only"]["hacking_rate"]
        out["both_hacks_more_than_positive_only"] = b["mean"] > p["mean"]
        for key, name in (
            ("hacking_rate", "hacking"),
            ("rubric_without_outcome_rate", "rubric_without_outcome"),
            ("ill_formed_rate", "ill_formed"),
            ("accuracy", "accuracy"),
        ):
            compare(f"both_minus_positive_only_{name}", "both", "positive_only", key)
        out["paper_both_minus_positive_only"] = PAPER["both"] - PAPER["positive_only"]
    else:
        out["both_hacks_more_than_positive_only"] = None
    return out
