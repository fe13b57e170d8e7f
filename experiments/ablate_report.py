"""The report of a `longtrace ablate` directory (OUT/report/, from OUT/ablation.json), written by `longtrace
ablate` and by `longtrace report OUT` (deploy/report.py hands a directory holding ablation.json to
`write_ablation_report`):
- variants.png: held-out accuracy over RL steps per reward variant (mean over seeds, ± one standard deviation
  shaded, each seed a thin line);
- hacking.png: final hacking, listing, ill-formed and unfinished rates per variant (bars: mean, whiskers: min/max
  over seeds);
- ablation.md: the per-variant table, every seed's figures (plateau seeds flagged) and hacking indicators, the
  paired differences over seeds, whether each of the paper's claims replicates, the plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.report import fmt
from experiments.ablate import ABLATION_FILE


def _plot_variants(plt: Any, summary: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, v) in enumerate(summary["variants"].items()):
        color = colors[i % len(colors)]
        x, acc = v["curve_steps"], v["curves"]["accuracy"]
        lo = [m - s for m, s in zip(acc["mean"], acc["std"], strict=True)]
        hi = [m + s for m, s in zip(acc["mean"], acc["std"], strict=True)]
        label = f"{name} (η {v['eta']}, {v['combination']})"
        ax.plot(x, acc["mean"], color=color, lw=2, marker="o", ms=3, label=label)
        ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        for ys in acc["per_seed"].values():
            ax.plot(x, ys, color=color, lw=0.6, alpha=0.5)
    ax.set_xlabel("RL step (0: the shared SFT warm start)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"held-out accuracy per reward variant: mean ± std over seeds {summary['seeds']} (thin: each seed)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HACKING_BARS = (
    ("hacking_rate", "hacking (wrong + lists entities)"),
    ("listing_rate", "lists entities"),
    ("ill_formed_rate", "ill-formed"),
    ("unfinished_rate", "unfinished"),
)


def _plot_hacking(plt: Any, summary: dict[str, Any], path: Path) -> None:
    names = list(summary["variants"])
    # Left: the rare failure modes (listing, ill-formed); right: wrong answers that still name the whole chain,
    # the rubric credit a wrong answer can earn (common on this task, so on its own scale).
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(HACKING_BARS)
    for j, (key, label) in enumerate(HACKING_BARS):
        xs = [i + (j - (len(HACKING_BARS) - 1) / 2) * width for i in range(len(names))]
        _bars(ax, xs, [summary["variants"][n][key] for n in names], width, label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("fraction of held-out samples (final step)")
    ax.set_title("hacking, ill-formed, unfinished (mean; whiskers: min-max over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    stats = [summary["variants"][n].get("rubric_without_outcome_rate") for n in names]
    if all(stats):
        _bars(ax2, list(range(len(names))), stats, 0.6, "wrong, whole chain named", color="tab:purple")
        ax2.set_xticks(range(len(names)), names, rotation=20)
        ax2.set_title("wrong answers naming the whole chain", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, xs: list[float], stats: list[Any], width: float, label: str, **kw: Any) -> None:
    means = [s["mean"] for s in stats]
    err = [
        [m - s["min"] for m, s in zip(means, stats, strict=True)],
        [s["max"] - m for m, s in zip(means, stats, strict=True)],
    ]
    ax.bar(xs, means, width, yerr=err, capsize=3, label=label, **kw)


def _ms(s: dict[str, Any]) -> str:
    return f"{fmt(s['mean'])} ± {fmt(s['std'])}"


def ablation_table(summary: dict[str, Any]) -> str:
    """The per-variant markdown table of an ablation summary (final step, mean ± std over seeds)."""
    lines = [
        "| variant | η | rule | held-out accuracy | per seed | gain over SFT | rubric hits | ill-formed | unfinished "
        "| lists entities | hacking | engine eval accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        per_seed = ", ".join(f"{s}: {fmt(x)}" for s, x in v["accuracy"]["per_seed"].items())
        lines.append(
            f"| {name} | {v['eta']} | {v['combination']} | {_ms(v['accuracy'])} | {per_seed} | {_ms(v['gain_over_sft'])} | "
            f"{_ms(v['rubric_hit_rate'])} | {_ms(v['ill_formed_rate'])} | {_ms(v['unfinished_rate'])} | "
            f"{_ms(v['listing_rate'])} | {_ms(v['hacking_rate'])} | {_ms(v['system_eval_accuracy'])} |"
        )
    return "\n".join(lines)


def _ci(xs: list[float]) -> str:
    return f"[{fmt(xs[0])}, {fmt(xs[1])}]"


def per_seed_tables(summary: dict[str, Any]) -> list[str]:
    """Every seed's final held-out accuracy per variant (gain over its SFT start in brackets, plateau flagged),
    then its hacking indicators per variant."""
    table, names = summary.get("per_seed", {}), list(summary["variants"])
    if not table:
        return []
    lines = [
        "## Every seed",
        "",
        f"Final held-out accuracy (gain over the seed's SFT start). A plateau seed: no variant gains more than "
        f"{summary['plateau_margin']} over SFT; it stays in every statistic.",
        "",
        "| seed | SFT | " + " | ".join(names) + " | plateau |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for seed, row in table.items():
        cells = [f"{fmt(row['variants'][n]['accuracy'])} ({fmt(row['variants'][n]['gain_over_sft'])})" for n in names]
        flag = "**plateau**" if row["plateau"] else "no"
        lines.append(f"| {seed} | {fmt(row['sft_accuracy'])} | " + " | ".join(cells) + f" | {flag} |")
    lines += [
        "",
        "Hacking indicators per seed (final step): lists entities / ill-formed / unfinished / hacking.",
        "",
        "| seed | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for seed, row in table.items():
        keys = ("listing_rate", "ill_formed_rate", "unfinished_rate", "hacking_rate")
        cells = [" / ".join(fmt(row["variants"][n][k]) for k in keys) for n in names]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def paired_table(summary: dict[str, Any]) -> list[str]:
    """Per pair and metric: the mean of the per-seed differences, their std, the t and bootstrap intervals."""
    paired = summary.get("paired", {})
    if not paired:
        return []
    lines = [
        "## Paired differences over seeds",
        "",
        "Variant minus reference on the same seed; intervals over seeds (t, and a bootstrap resampling seeds, "
        "10,000 draws); P(>0): the fraction of bootstrap draws above 0.",
        "",
        "| pair | metric | per seed | mean | std | t 95% | bootstrap 95% | P(>0) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, entry in paired.items():
        for key, d in entry["metrics"].items():
            per_seed = ", ".join(f"{s}: {fmt(x)}" for s, x in d["per_seed"].items())
            lines.append(
                f"| {pair} | {key} | {per_seed} | {fmt(d['mean'])} | {fmt(d['std'])} | {_ci(d['t_ci95'])} | "
                f"{_ci(d['bootstrap_ci95'])} | {fmt(d['bootstrap_frac_positive'], 2)} | {d['n_seeds']} |"
            )
    return [*lines, ""]


def replicates_section(summary: dict[str, Any]) -> list[str]:
    """The paper's claims whose variants were run, each with its verdict and the paired difference behind it."""
    claims = summary.get("replicates", {})
    lines = [
        "## Replicates?",
        "",
        "A claim replicates when the t and the bootstrap 95% intervals of its per-seed paired difference both "
        "exclude 0 in the claimed direction, contradicts when both exclude 0 the other way, and is inconclusive "
        "otherwise (always with one seed). Claims whose variants were not run are left out.",
        "",
    ]
    if not claims:
        lines.append("- no claim of the paper had its variants run")
    for c in claims.values():
        lines.append(f"- {c['claim']}: **{c['verdict']}**")
        for d in c["comparisons"]:
            sign = "> 0" if d["direction"] > 0 else "< 0"
            lines.append(
                f"  - {d['pair']} {d['metric']} (claimed {sign}): mean {fmt(d['mean'])}, t 95% {_ci(d['t_ci95'])}, "
                f"bootstrap 95% {_ci(d['bootstrap_ci95'])}, P(>0) {fmt(d['bootstrap_frac_positive'], 2)}, "
                f"{d['n_seeds']} seeds: {d['verdict']}"
            )
    plateau = summary.get("plateau_seeds", [])
    if plateau:
        lines.append(f"- plateau seeds (kept in the statistics): {plateau}")
    return [*lines, ""]


def render_ablation_markdown(summary: dict[str, Any], out_dir: Path) -> str:
    lines = [
        f"# Reward ablation: {out_dir}",
        "",
        f"Seeds {summary['seeds']}, {summary['rl_steps']} RL steps from each seed's shared SFT warm start; held-out "
        f"accuracy at steps {summary['eval_steps']}. {summary['held_out']}.",
        f"Hacking: {summary['hacking_definition']}.",
        "",
        ablation_table(summary),
        "",
        *replicates_section(summary),
        *per_seed_tables(summary),
        *paired_table(summary),
        "## Plots",
        "",
        "![held-out accuracy per variant](variants.png)",
        "",
        "![hacking and ill-formed outputs](hacking.png)",
        "",
    ]
    return "\n".join(lines)


def write_ablation_report(out_dir: str | Path) -> Path:
    """Write variants.png, hacking.png and ablation.md into OUT/report from OUT/ablation.json; the .md path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(out_dir)
    summary = json.loads((root / ABLATION_FILE).read_text())
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    _plot_variants(plt, summary, out / "variants.png")
    _plot_hacking(plt, summary, out / "hacking.png")
    path = out / "ablation.md"
    path.write_text(render_ablation_markdown(summary, root))
    return path
