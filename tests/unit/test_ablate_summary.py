"""The ablation's statistics (experiments/ablate_summary.py, issue 23) on hand-made per-seed numbers: differences
between variants are judged on per-seed paired differences (t and bootstrap intervals over seeds), every seed is
reported, plateau seeds are flagged but kept, and the report shows all of it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from experiments.ablate_report import render_ablation_markdown
from experiments.ablate_summary import (
    BOOTSTRAP_DRAWS,
    FINAL_KEYS,
    PLATEAU_MARGIN,
    paired_comparisons,
    paired_difference,
    per_seed_table,
    replicates,
    spread,
    summarize,
    t_975,
    verdict,
)


def _per_seed(xs: list[float]) -> dict[str, float]:
    return {str(s): x for s, x in enumerate(xs)}


def _diff(xs: list[float]) -> dict[str, Any]:
    """paired_difference of a variant at `xs` per seed against a reference at 0.5 on every seed."""
    return paired_difference(_per_seed([0.5 + x for x in xs]), _per_seed([0.5] * len(xs)))


def test_a_difference_positive_in_every_seed_replicates() -> None:
    """Guards against intervals or bootstrap fractions that do not follow the per-seed differences: a gain on every
    seed must give a bootstrap fraction of 1.0, both intervals above 0, and the verdict "replicates" (and
    "contradicts" for the opposite claim)."""
    d = _diff([0.03, 0.05, 0.04, 0.06, 0.02])
    assert d["n_seeds"] == 5 and d["mean"] == pytest.approx(0.04)
    assert d["std"] == pytest.approx(math.sqrt(0.00025))
    half = 2.776 * math.sqrt(0.00025) / math.sqrt(5)
    assert d["t_ci95"] == pytest.approx([0.04 - half, 0.04 + half])
    assert d["bootstrap_frac_positive"] == 1.0
    assert 0.02 <= d["bootstrap_ci95"][0] < d["mean"] < d["bootstrap_ci95"][1] <= 0.06
    assert verdict(d, 1) == "replicates" and verdict(d, -1) == "contradicts"


def test_one_large_negative_seed_makes_the_difference_inconclusive() -> None:
    """Guards against a verdict driven by the majority of seeds or by the mean alone: four seeds at +0.10 and one
    at -0.50 must give intervals that include 0 and "inconclusive" either way."""
    d = _diff([0.1, 0.1, 0.1, 0.1, -0.5])
    assert d["t_ci95"][0] < 0 < d["t_ci95"][1]
    assert d["bootstrap_ci95"][0] < 0 < d["bootstrap_ci95"][1]
    # The draws without the bad seed: (4/5)^5 of them.
    assert d["bootstrap_frac_positive"] == pytest.approx(0.8**5, abs=0.02)
    assert verdict(d, 1) == "inconclusive" and verdict(d, -1) == "inconclusive"


def test_verdict_needs_both_intervals_to_exclude_zero() -> None:
    """Guards against a verdict taken from the bootstrap alone, whose percentile interval stays within the seeds'
    values and is too narrow with 5 seeds: here it excludes 0 but the t interval does not."""
    d = _diff([0.05, 0.05, 0.05, 0.05, -0.02])
    assert d["bootstrap_ci95"][0] > 0 and d["t_ci95"][0] < 0
    assert verdict(d, 1) == "inconclusive"


def test_one_seed_is_inconclusive_however_many_samples() -> None:
    """Guards against the pooled-samples z coming back: one seed with a 20-point gap over a huge held-out set has
    no seed-to-seed variance to judge, so its intervals are NaN and the verdict is "inconclusive"."""
    d = _diff([0.2])
    assert d["n_seeds"] == 1 and d["mean"] == pytest.approx(0.2)
    assert all(math.isnan(x) for x in [d["std"], *d["t_ci95"], *d["bootstrap_ci95"], d["bootstrap_frac_positive"]])
    assert verdict(d, 1) == "inconclusive"


def test_the_bootstrap_is_reproducible_and_seeds_are_paired() -> None:
    """Guards against an unseeded bootstrap (a report that changes on every re-summary) and against unpaired
    differences: a seed only one variant has, or a NaN, is left out, not compared with another seed."""
    a = _diff([0.01, -0.02, 0.04, 0.0, 0.03])
    assert a == _diff([0.01, -0.02, 0.04, 0.0, 0.03])
    assert 0 < a["bootstrap_frac_positive"] < 1 and a["bootstrap_frac_positive"] * BOOTSTRAP_DRAWS % 1 == 0
    d = paired_difference({"0": 0.6, "1": 0.7, "2": math.nan, "3": 0.9}, {"0": 0.5, "1": 0.5, "2": 0.5})
    assert d["per_seed"] == pytest.approx({"0": 0.1, "1": 0.2}) and d["n_seeds"] == 2


def test_t_quantiles() -> None:
    """Guards against a wrong t table (an interval too narrow for few seeds) or a jump beyond df 30."""
    assert t_975(1) == 12.706 and t_975(4) == 2.776 and t_975(30) == 2.042
    assert 2.035 < t_975(31) < 2.042 and t_975(1000) == pytest.approx(1.962, abs=1e-3)
    assert all(t_975(df) > t_975(df + 1) for df in range(1, 100))
    assert math.isnan(t_975(0))


def _variant(acc: list[float], eta: float = 0.3, combination: str = "positive_only", **rates: list[float]) -> Any:
    v: dict[str, Any] = {"eta": eta, "combination": combination, "accuracy": spread(dict(enumerate(acc)))}
    for key in ("hacking_rate", "listing_rate", "rubric_without_outcome_rate", "ill_formed_rate", "unfinished_rate"):
        v[key] = spread(dict(enumerate(rates.get(key, [0.0] * len(acc)))))
    return v


def test_claims_are_judged_only_when_their_variants_ran() -> None:
    """Guards against claims reported for variants that were not run, against the wrong sign for "positive-only
    beats both" (its pair is both minus positive_only), and against an η claim that replicates while one η
    comparison contradicts it."""
    variants = {
        "positive_only": _variant([0.60, 0.62, 0.58, 0.61, 0.63], hacking_rate=[0.0] * 5),
        "both": _variant([0.50, 0.52, 0.49, 0.53, 0.51], combination="both", hacking_rate=[0.1, 0.0, 0.3, 0.0, 0.0]),
    }
    paired = paired_comparisons(variants)
    assert set(paired) == {"both_minus_positive_only"}
    got = replicates(paired)
    assert set(got) == {"positive_only_beats_both", "both_hacks_more"}
    assert got["positive_only_beats_both"]["verdict"] == "replicates"
    assert got["both_hacks_more"]["verdict"] == "inconclusive"

    variants["outcome_only"] = _variant([0.55, 0.70, 0.40, 0.65, 0.50], eta=0.0)
    variants["eta_10"] = _variant([0.50, 0.52, 0.48, 0.51, 0.50], eta=0.1)  # below 0.3 on every seed
    variants["eta_50"] = _variant([0.70, 0.72, 0.69, 0.71, 0.73], eta=0.5)  # above 0.3 on every seed
    got = replicates(paired_comparisons(variants))
    assert got["rubric_beats_outcome_only"]["verdict"] == "inconclusive"  # +0.04 mean, seeds disagree
    eta = got["eta_03_best"]
    assert [c["verdict"] for c in eta["comparisons"]] == ["replicates", "contradicts"]
    assert eta["verdict"] == "contradicts"
    del variants["eta_50"]
    assert replicates(paired_comparisons(variants))["eta_03_best"]["verdict"] == "replicates"


def test_plateau_seed_is_flagged_and_kept() -> None:
    """Guards against a seed that never left the plateau being silently averaged in, or silently dropped: it is
    flagged in the per-seed table and still counts in the paired statistics."""
    sft = {0: 0.30, 1: 0.05, 2: 0.31}
    variants = {
        "outcome_only": _variant([0.40, 0.06, 0.38], eta=0.0) | {"gain_over_sft": spread({0: 0.10, 1: 0.01, 2: 0.07})},
        "positive_only": _variant([0.45, 0.05, 0.42]) | {"gain_over_sft": spread({0: 0.15, 1: 0.0, 2: 0.11})},
    }
    table = per_seed_table(sft, variants)
    assert [table[s]["plateau"] for s in ("0", "1", "2")] == [False, True, False]
    assert table["1"]["sft_accuracy"] == 0.05 and table["1"]["variants"]["positive_only"]["accuracy"] == 0.05
    assert paired_comparisons(variants)["positive_only_minus_outcome_only"]["metrics"]["accuracy"]["n_seeds"] == 3
    edge = {"v": {"gain_over_sft": spread({0: PLATEAU_MARGIN}), **_variant([0.5])}}
    assert per_seed_table({0: 0.48}, edge)["0"]["plateau"]


def _indicators(acc: float, hacking: float = 0.0) -> dict[str, Any]:
    return {k: 0.0 for k in FINAL_KEYS} | {"accuracy": acc, "hacking_rate": hacking, "num_samples": 100_000}


def test_summary_json_and_report_show_every_seed_and_no_pooled_z(tmp_path: Path) -> None:
    """Guards against a summary whose verdict comes from pooling every seed's held-out samples (100,000 per run
    here: a pooled z would call +0.04 certain) and against a report that hides seeds: the JSON and the markdown
    carry each seed's accuracy, the plateau flag, the paired intervals and the verdicts, and no z."""
    gains = {"outcome_only": [0.10, 0.0, 0.10, 0.12, 0.08], "positive_only": [0.22, 0.01, 0.0, 0.20, 0.07]}
    seeds = list(range(5))
    variants = [SimpleNamespace(name=n, eta=0.3 if n == "positive_only" else 0.0, combination="positive_only")
                for n in gains]  # fmt: skip
    cfg = SimpleNamespace(seeds=seeds, hacking=SimpleNamespace(listing_min_entities=4, entity_pattern="E"))
    plan: Any = SimpleNamespace(cfg=cfg, variants=variants, eval_steps=[0, 2], rl_steps=2)
    sft = {s: {"indicators": _indicators(0.3), "wall_s": 1.0, "system_eval": {}} for s in seeds}
    runs = {
        (s, n): {"curve": {2: _indicators(0.3 + g[s])}, "system_eval": {"accuracy": 0.3}, "train": {}, "wall_s": 1.0}
        for n, g in gains.items()
        for s in seeds
    }
    summary = json.loads(json.dumps(summarize(plan, sft, runs)))  # as ablation.json holds it
    assert summary["plateau_seeds"] == [1] and summary["per_seed"]["1"]["plateau"] is True
    assert summary["per_seed"]["0"]["variants"]["positive_only"]["accuracy"] == pytest.approx(0.52)
    acc = summary["paired"]["positive_only_minus_outcome_only"]["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.02) and acc["n_seeds"] == 5
    assert summary["replicates"]["rubric_beats_outcome_only"]["verdict"] == "inconclusive"
    assert not any(k.endswith("_z") for k in summary["checks"]) and "_z" not in json.dumps(summary["replicates"])

    md = render_ablation_markdown(summary, tmp_path)
    assert "## Replicates?" in md and "**inconclusive**" in md and "## Every seed" in md
    assert "| 1 | 0.300 | 0.300 (0.000) | 0.310 (0.010) | **plateau** |" in md
    assert "| positive_only_minus_outcome_only | accuracy |" in md and " z " not in md
