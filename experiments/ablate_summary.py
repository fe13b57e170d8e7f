"""The ablation's summary (OUT/ablation.json): per-variant figures with their spread over seeds, the accuracy
curves, every seed's own figures (a seed that never left the plateau flagged, not dropped), and the paper's claims
judged on per-seed paired differences (issue 23). Pure functions of the per-run results that experiments/ablate.py
collects.

The unit of replication is the seed: each seed trains every variant from its own SFT start, so a difference between
two variants is measured once per seed (variant minus reference on the same seed), and its uncertainty is the
spread of those per-seed differences (a t interval over seeds and a bootstrap that resamples seeds). The held-out
samples of one seed are not independent replicates of the training run: pooling them over seeds (a two-proportion
z) ignores seed-to-seed variance and is no longer computed.
"""

from __future__ import annotations

import math
import random
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
        # Held-out samples behind the final rates, over all seeds (the evaluation's size, not a replicate count).
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
    table = per_seed_table({s: sft[s]["indicators"]["accuracy"] for s in cfg.seeds}, variants)
    paired = paired_comparisons(variants)
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
        "plateau_margin": PLATEAU_MARGIN,
        "per_seed": table,
        "plateau_seeds": [int(s) for s, row in table.items() if row["plateau"]],
        "paired": paired,
        "replicates": replicates(paired),
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


# -- every seed on its own


PLATEAU_MARGIN = 0.02
"""A seed is on the plateau when no variant's final held-out accuracy beats its SFT start by more than this."""
PER_SEED_KEYS = ("accuracy", "gain_over_sft", "listing_rate", "ill_formed_rate", "unfinished_rate", "hacking_rate")


def per_seed_table(sft_accuracy: dict[int, float], variants: dict[str, Any]) -> dict[str, Any]:
    """{seed: {sft_accuracy, plateau, variants: {name: final figures}}}. A plateau seed stays in every statistic;
    the flag only says that RL never moved it (so it pulls every variant's mean towards the SFT start)."""
    out: dict[str, Any] = {}
    for seed, acc in sft_accuracy.items():
        s = str(seed)
        rows = {name: {k: v[k]["per_seed"][s] for k in PER_SEED_KEYS} for name, v in variants.items()}
        plateau = all(not row["gain_over_sft"] > PLATEAU_MARGIN for row in rows.values())
        out[s] = {"sft_accuracy": acc, "plateau": plateau, "variants": rows}
    return out


# -- paired differences over seeds


PAIRED_KEYS = ("accuracy", "hacking_rate", "listing_rate", "rubric_without_outcome_rate", "ill_formed_rate")
BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 23
# Two-sided 95% t quantiles (0.975) for 1..30 degrees of freedom (scipy is not a dependency).
T_975: tuple[float, ...] = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179)
T_975 += (2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052)
T_975 += (2.048, 2.045, 2.042)


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (above 30: Cornish-Fisher from 1.96)."""
    if df < 1:
        return math.nan
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """a minus b per seed (seeds both have, NaNs left out), with the mean, the standard deviation over seeds, a
    t-based 95% interval over seeds and a bootstrap over seeds (seeds resampled with replacement, fixed RNG): its
    95% percentile interval and the fraction of draws whose mean difference is > 0. With one seed there is no
    seed-to-seed variance to judge: std and both intervals are NaN."""
    diffs = {s: a[s] - b[s] for s in a if s in b and not math.isnan(a[s] - b[s])}
    xs = list(diffs.values())
    n = len(xs)
    out: dict[str, Any] = {"n_seeds": n, "per_seed": diffs, "mean": mean(xs)}
    if n < 2:
        nan = math.nan
        return out | {"std": nan, "t_ci95": [nan, nan], "bootstrap_ci95": [nan, nan], "bootstrap_frac_positive": nan}
    sd = statistics.stdev(xs)
    half = t_975(n - 1) * sd / math.sqrt(n)
    rng = random.Random(BOOTSTRAP_SEED)
    draws = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(BOOTSTRAP_DRAWS))
    return out | {
        "std": sd,
        "t_ci95": [out["mean"] - half, out["mean"] + half],
        "bootstrap_ci95": [_quantile(draws, 0.025), _quantile(draws, 0.975)],
        "bootstrap_frac_positive": sum(d > 0 for d in draws) / BOOTSTRAP_DRAWS,
    }


REFERENCES = {"positive_only": "outcome_only", "outcome_only": None}
"""Each variant's reference: positive_only against outcome_only, every other variant (both, the eta sweep, any
other rule) against positive_only, the paper's rule."""


def paired_comparisons(variants: dict[str, Any]) -> dict[str, Any]:
    """{"<variant>_minus_<reference>": {variant, reference, eta, combination (variant's, reference's), metrics: {key:
    paired_difference}}} for every variant whose reference was run."""
    out: dict[str, Any] = {}
    for name in variants:
        ref = REFERENCES.get(name, "positive_only")
        if ref is None or ref == name or ref not in variants:
            continue
        metrics = {
            k: paired_difference(variants[name][k]["per_seed"], variants[ref][k]["per_seed"])
            for k in PAIRED_KEYS
            if k in variants[name] and k in variants[ref]
        }
        out[f"{name}_minus_{ref}"] = {
            "variant": name,
            "reference": ref,
            "eta": [variants[name]["eta"], variants[ref]["eta"]],
            "combination": [variants[name]["combination"], variants[ref]["combination"]],
            "metrics": metrics,
        }
    return out


def verdict(stats: dict[str, Any], direction: int) -> str:
    """A claim's verdict on one paired difference: "replicates" when both 95% intervals over seeds (t and
    bootstrap) exclude 0 in the claimed direction (`direction` +1: the difference is claimed > 0, -1: < 0),
    "contradicts" when both exclude it the other way, "inconclusive" otherwise and with fewer than 2 seeds. Both,
    because the bootstrap percentile interval never leaves the range of the seeds' values and is too narrow at 5
    seeds, while the t interval assumes normal per-seed differences."""
    (t_lo, t_hi), (b_lo, b_hi) = stats["t_ci95"], stats["bootstrap_ci95"]
    if stats["n_seeds"] < 2 or any(math.isnan(x) for x in (t_lo, t_hi, b_lo, b_hi)):
        return "inconclusive"
    lo, hi = min(t_lo, b_lo) * direction, max(t_hi, b_hi) * direction
    lo, hi = min(lo, hi), max(lo, hi)
    if lo > 0:
        return "replicates"
    if hi < 0:
        return "contradicts"
    return "inconclusive"


CLAIMS = {
    # id: (the paper's claim, pair, metric, the sign of the pair's difference the claim asserts)
    "rubric_beats_outcome_only": (
        "positive-only rubric (η 0.3) > outcome-only in held-out accuracy (paper 59.0 vs 53.7)",
        *("positive_only_minus_outcome_only", "accuracy", 1),
    ),
    "positive_only_beats_both": (
        "positive-only rubric > rubric paid on every sample in held-out accuracy (paper 59.0 vs 57.1)",
        *("both_minus_positive_only", "accuracy", -1),
    ),
    "both_hacks_more": (
        "rubric paid on every sample hacks (wrong answers listing entities) more than positive-only",
        *("both_minus_positive_only", "hacking_rate", 1),
    ),
}
ETA_CLAIM = (
    "η = 0.3 (positive_only) has the best held-out accuracy among the etas run (paper 0.1: 58.3, 0.3: 59.0, 0.5: 57.1)"
)


def _comparison(paired: dict[str, Any], pair: str, metric: str, direction: int) -> dict[str, Any]:
    stats = paired[pair]["metrics"][metric]
    keep = ("n_seeds", "mean", "std", "t_ci95", "bootstrap_ci95", "bootstrap_frac_positive")
    return (
        {"pair": pair, "metric": metric, "direction": direction}
        | {k: stats[k] for k in keep}
        | {"verdict": verdict(stats, direction)}
    )


def _other_eta(entry: dict[str, Any]) -> bool:
    """A positive-only variant at an η > 0 other than its reference's 0.3 (the paper's η sweep)."""
    (eta, ref_eta), combinations = entry["eta"], entry["combination"]
    return combinations == ["positive_only"] * 2 and ref_eta == 0.3 and eta not in (0.0, 0.3)


def replicates(paired: dict[str, Any]) -> dict[str, Any]:
    """The paper's claims whose variants were run: {id: {claim, verdict, comparisons}}. η = 0.3 best among the
    etas run: positive_only (η 0.3) against every other positive-only η > 0; it replicates when every comparison
    does, contradicts when any does."""
    out: dict[str, Any] = {}
    for cid, (claim, pair, metric, direction) in CLAIMS.items():
        if pair in paired and metric in paired[pair]["metrics"]:
            c = _comparison(paired, pair, metric, direction)
            out[cid] = {"claim": claim, "verdict": c["verdict"], "comparisons": [c]}
    etas = [p for p, e in paired.items() if _other_eta(e)]
    if etas:
        comps = [_comparison(paired, p, "accuracy", -1) for p in etas]
        verdicts = {c["verdict"] for c in comps}
        v = (
            "contradicts"
            if "contradicts" in verdicts
            else "inconclusive"
            if verdicts - {"replicates"}
            else "replicates"
        )
        out["eta_03_best"] = {"claim": ETA_CLAIM, "verdict": v, "comparisons": comps}
    return out


def direction_checks(variants: dict[str, Any]) -> dict[str, Any]:
    """The paper's directions on this task by the means over seeds (None when a variant is missing): positive-only
    >= outcome-only in final held-out accuracy, and rubric-on-every-sample hacks more than positive-only. A mean's
    direction is not evidence on its own: `replicates` judges each claim on the per-seed paired differences."""
    out: dict[str, Any] = {}

    def compare(name: str, a: str, b: str, key: str) -> None:
        """`name`: variant a's mean final `key` minus variant b's."""
        out[name] = variants[a][key]["mean"] - variants[b][key]["mean"]

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
