"""`longtrace report RUN_DIR`: PNG plots and a markdown summary of a `longtrace up` run (into RUN_DIR/report/).

Reads only the run directory (deploy/launcher/rundir.py names its files and the metric keys):
- reward.png: reward, accuracy (outcome) and rubric hit rate per step, held-out evaluations as markers;
- throughput.png: steps per minute and samples per second (over the last 10 steps), train tokens per second;
- staleness.png: mean lag of the trained groups and the groups dropped as stale;
- queues.png: depth of the tasks / rollouts / scored / dead streams over time;
- heldout_during.png: held-out accuracy during RL phases (`[eval] every_steps`; deploy/report_evals.py);
- report.md: per-phase summary, held-out accuracy before and after each phase beside context-heuristic baselines
  (deploy/launcher/baselines.py), the plots;
- summary.json: the held-out accuracies (`heldout.during_rl`: the in-training evals' [{step, accuracy}]), the
  baselines, the phase summaries and the judge, for scripts.
Steps are numbered run-wide (phases one after another); phase boundaries are drawn as vertical lines.

`longtrace report OUT` of a directory that is not one run but a harness's output (DIRECTORY_REPORTS: a `longtrace
ablate` directory holds ablation.json) hands it to that harness's report writer.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datagen.synth.heuristics import RANDOMIZED
from deploy.launcher import rundir as rd
from deploy.launcher.baselines import NUM_SEEDS, run_baselines
from deploy.launcher.dashboard import fmt_duration, rates
from deploy.launcher.rundir import RunDir
from deploy.report_evals import PLOT as DURING_PLOT
from deploy.report_evals import during_rl, live_eval_lines, plot_live_evals

DIRECTORY_REPORTS: dict[str, str] = {"ablation.json": "experiments.ablate_report:write_ablation_report"}
"""Marker file -> `module:function(dir) -> Path` writing the report of such a directory. Named, not imported:
experiments sit above deploy (deploy/cli.py loads their commands by name the same way)."""


def _num(x: Any) -> float:
    return float(x) if x is not None else math.nan


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def fmt(x: float, digits: int = 3) -> str:
    """`x` with `digits` decimals; "-" for NaN (a figure the run did not produce)."""
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def phase_summaries(run: RunDir) -> list[dict[str, Any]]:
    """One dict per phase: steps, wall time, reward/accuracy/rubric over the first and last 10 steps, drops."""
    ends = {e["phase"]: e for e in run.phase_events() if e["event"] == "end"}
    starts = {e["phase"]: e for e in run.phase_events() if e["event"] == "start"}
    out = []
    for phase in run.phase_names():
        steps = run.metrics(phase)
        first, last = steps[:10], steps[-10:]
        start, end = starts.get(phase, {}), ends.get(phase, {})
        wall = end.get("time_s", math.nan) - start.get("time_s", math.nan) if end and start else math.nan
        r = rates(steps, window=max(1, len(steps) - 1))
        out.append(
            {
                "phase": phase,
                "kind": start.get("kind", ""),
                "status": end.get("status", "running"),
                "steps": len(steps),
                "wall_s": wall,
                "steps_per_min": r["steps_per_min"],
                "samples_per_s": r["samples_per_s"],
                "reward_first": _mean([_num(m.get(rd.REWARD)) for m in first]),
                "reward_last": _mean([_num(m.get(rd.REWARD)) for m in last]),
                "accuracy_first": _mean([_num(m.get(rd.ACCURACY)) for m in first]),
                "accuracy_last": _mean([_num(m.get(rd.ACCURACY)) for m in last]),
                "rubric_last": _mean([_num(m.get(rd.RUBRIC_HITS)) for m in last]),
                "loss_last": _mean([_num(m.get(rd.LOSS)) for m in last]),
                "staleness_mean": _mean([rd.mean_staleness(m) for m in steps]),
                "dropped_stale": _num(steps[-1].get(rd.GROUPS_DROPPED_STALE)) if steps else math.nan,
                "trained": _num(steps[-1].get(rd.GROUPS_TRAINED)) if steps else math.nan,
            }
        )
    return out


def _phase_lines(ax: Any, metrics: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for m in metrics:
        if m["phase"] not in seen:
            seen.add(m["phase"])
            x = m["global_step"] - 0.5
            ax.axvline(x, color="grey", lw=0.8, ls="--")
            ax.text(x, 1.0, f" {m['phase']}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")


def rl_segments(metrics: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The steps of each RL phase, one list per phase: SFT steps have no reward, accuracy or rubric hits, and
    two RL phases around an SFT phase are not joined by a line."""
    segments: list[list[dict[str, Any]]] = []
    for m in metrics:
        if m.get("phase_kind") != "rl":
            continue
        if segments and segments[-1][-1]["phase"] == m["phase"]:
            segments[-1].append(m)
        else:
            segments.append([m])
    return segments


def _plot_reward(plt: Any, run: RunDir, metrics: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    curves = ((rd.REWARD, "reward"), (rd.ACCURACY, "accuracy (outcome)"), (rd.RUBRIC_HITS, "rubric hit rate"))
    for (key, label), color in zip(curves, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        for i, segment in enumerate(rl_segments(metrics)):
            x = [m["global_step"] for m in segment]
            ax.plot(x, [_num(m.get(key)) for m in segment], label=label if i == 0 else None, lw=1.2, color=color)
    evals = run.evals()
    if evals:
        ax.scatter(
            [e["step"] for e in evals],
            [e["accuracy"] for e in evals],
            marker="D",
            color="black",
            zorder=5,
            label="held-out accuracy",
        )
        for e in evals:
            ax.annotate(
                f"{e['accuracy']:.2f}",
                (e["step"], e["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    _phase_lines(ax, metrics)
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("reward, accuracy and rubric hits (training groups of RL phases) per step")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(plt: Any, metrics: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    x, spm, sps = [], [], []
    for i, m in enumerate(metrics):
        same = [s for s in metrics[: i + 1] if s["phase"] == m["phase"]]
        r = rates(same)
        x.append(m["global_step"])
        spm.append(r["steps_per_min"])
        sps.append(r["samples_per_s"])
    ax.plot(x, spm, label="steps/min", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("steps/min")
    ax2 = ax.twinx()
    ax2.plot(x, sps, label="samples/s", color="tab:orange")
    ax2.plot(
        x,
        [_num(m.get(rd.TOKENS_PER_S)) / 100 for m in metrics],
        label="train tokens/s / 100",
        color="tab:green",
        lw=0.8,
    )
    ax2.set_ylabel("samples/s, tokens/s / 100")
    _phase_lines(ax, metrics)
    lines = ax.get_lines()[:1] + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    ax.set_title("throughput (over the last 10 steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_staleness(plt: Any, metrics: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    x = [m["global_step"] for m in metrics]
    ax.plot(x, [rd.mean_staleness(m) for m in metrics], label="mean lag of trained groups (versions)")
    ax.plot(x, [_num(m.get(rd.GROUPS_DROPPED_STALE)) for m in metrics], label="groups dropped as stale (total)")
    _phase_lines(ax, metrics)
    ax.set_xlabel("step")
    ax.set_title("staleness")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_queues(plt: Any, run: RunDir, path: Path) -> None:
    samples = run.system()
    fig, ax = plt.subplots(figsize=(9, 4))
    if samples:
        t0 = samples[0]["time_s"]
        t = [(s["time_s"] - t0) / 60 for s in samples]
        for stream in rd.STREAMS:
            ax.plot(t, [s.get(stream, math.nan) for s in samples], label=stream, lw=1.0)
        phase = None
        for s, ts in zip(samples, t, strict=True):
            if s["phase"] != phase:
                phase = s["phase"]
                ax.axvline(ts, color="grey", lw=0.8, ls="--")
                ax.text(ts, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
        ax.legend(fontsize=8)
    ax.set_xlabel("minutes since the first phase started")
    ax.set_ylabel("entries (unread + pending)")
    ax.set_title("queue depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and report.md into RUN_DIR/report; return the path of report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for marker, target in DIRECTORY_REPORTS.items():
        if (Path(run_dir) / marker).is_file():
            module, name = target.split(":")
            writer: Callable[[str | Path], Path] = getattr(importlib.import_module(module), name)
            return writer(run_dir)
    run = RunDir.at(run_dir)
    if not run.phases_file.is_file():
        raise ValueError(f"RUN_DIR {run_dir}: no {run.phases_file.name}, not a `longtrace up` run directory")
    out = run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics = run.all_metrics()
    _plot_reward(plt, run, metrics, out / "reward.png")
    _plot_throughput(plt, metrics, out / "throughput.png")
    _plot_staleness(plt, metrics, out / "staleness.png")
    _plot_queues(plt, run, out / "queues.png")
    plot_live_evals(plt, run, out / DURING_PLOT)
    summary = report_summary(run)
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(run, summary))
    return path


def _finite(x: Any) -> Any:
    """`x` with NaN (a figure the run did not produce) as None, so summary.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def heldout_accuracies(run: RunDir) -> dict[str, float | None]:
    """`before`: the first phase's "before" eval; `after_sft` / `after_rl`: the "after" eval of the last SFT / RL
    phase that has one (the latest line when a phase has several); None where absent."""
    evals = run.evals()
    kinds = {e["phase"]: e.get("kind") for e in run.phase_events()}
    names = run.phase_names()

    def acc(phases: list[str], when: str) -> float | None:
        for phase in reversed(phases):
            found = [e for e in evals if e["phase"] == phase and e["when"] == when]
            if found:
                return float(found[-1]["accuracy"])
        return None

    return {
        "before": acc(names[:1], "before"),
        "after_sft": acc([p for p in names if kinds.get(p) == "sft"], "after"),
        "after_rl": acc([p for p in names if kinds.get(p) == "rl"], "after"),
    }


def report_summary(run: RunDir) -> dict[str, Any]:
    """The content of summary.json: held-out accuracies, baselines (every heuristic, `untrained`, `sft_only`),
    the mean distinct cities per context, the gains, the phase summaries and the judge."""
    heldout: dict[str, Any] = {**heldout_accuracies(run), "during_rl": during_rl(run)}
    b = run_baselines(run)
    heuristics = {k: v for k, v in b["baselines"].items() if k != "oracle"}
    best = max(heuristics, key=lambda k: heuristics[k], default=None)
    rl, sft = heldout["after_rl"], heldout["after_sft"]
    return {
        "heldout": heldout,
        "baselines": {**b["baselines"], "untrained": heldout["before"], "sft_only": sft},
        "baselines_skipped": b["skipped"],
        "baseline_questions": b["num_questions"],
        "distinct_cities_mean": b["distinct_cities_mean"],
        "best_heuristic": best,
        "rl_minus_sft": rl - sft if rl is not None and sft is not None else None,
        "rl_minus_best_heuristic": rl - heuristics[best] if rl is not None and best is not None else None,
        "phases": phase_summaries(run),
        "judge": b["judge"],
        "eval_split": b["eval_split"],
    }


def _baseline_lines(summary: dict[str, Any]) -> list[str]:
    heldout, base = summary["heldout"], summary["baselines"]

    def cell(x: float | None) -> str:
        return "-" if x is None else fmt(x)

    split = summary.get("eval_split") or "heldout"
    lines = ["", "## Held-out accuracy and baselines", "", f"| | accuracy ({split} split) |", "|---|---|"]
    lines += [f"| untrained | {cell(heldout['before'])} |", f"| SFT only | {cell(heldout['after_sft'])} |"]
    lines += [f"| RL | {cell(heldout['after_rl'])} |"]
    lines += [f"| {k} | {cell(v)} |" for k, v in base.items() if k not in ("untrained", "sft_only", "oracle")]
    if "oracle" in base:
        lines.append(f"| oracle (follows the chain) | {cell(base['oracle'])} |")
    lines.append("")
    if summary["baselines_skipped"]:
        lines.append(f"Context heuristics skipped: {summary['baselines_skipped']}.")
    else:
        lines.append(
            f"Heuristics on the first {summary['baseline_questions']} held-out questions, graded by the run's judge; "
            f"{fmt(summary['distinct_cities_mean'], 1)} distinct cities per context on average; the randomized ones "
            f"({', '.join(sorted(RANDOMIZED))}) are means over {NUM_SEEDS} seeds."
        )
    rl, sft = heldout["after_rl"], heldout["after_sft"]
    if summary["rl_minus_sft"] is not None:
        lines += [
            "",
            f"Held-out accuracy after RL ({rl:.3f}) minus after SFT ({sft:.3f}): **{summary['rl_minus_sft']:+.3f}**",
        ]
    if summary["rl_minus_best_heuristic"] is not None:
        best = summary["best_heuristic"]
        lines += [
            "",
            f"Held-out accuracy after RL ({rl:.3f}) minus the best context heuristic ({best}, {base[best]:.3f}): "
            f"**{summary['rl_minus_best_heuristic']:+.3f}**",
        ]
    return lines


def render_markdown(run: RunDir, summary: dict[str, Any] | None = None) -> str:
    lines = [f"# Run report: {run.root}", "", "## Phases", ""]
    lines += [
        "| phase | kind | status | steps | wall | steps/min | samples/s | reward (first→last 10) | "
        "accuracy (first→last 10) | rubric hits (last 10) | loss (last 10) | mean lag | dropped stale |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in phase_summaries(run):
        lines.append(
            f"| {s['phase']} | {s['kind']} | {s['status']} | {s['steps']} | {fmt_duration(s['wall_s'])} | "
            f"{fmt(s['steps_per_min'], 1)} | {fmt(s['samples_per_s'], 1)} | {fmt(s['reward_first'])} → "
            f"{fmt(s['reward_last'])} | {fmt(s['accuracy_first'])} → {fmt(s['accuracy_last'])} | "
            f"{fmt(s['rubric_last'])} | {fmt(s['loss_last'])} | {fmt(s['staleness_mean'], 2)} | "
            f"{fmt(s['dropped_stale'], 0)} |"
        )
    evals = run.evals()
    if evals:
        lines += ["", "## Held-out evaluation", ""]
        lines += [
            "| phase | when | step | accuracy | rubric hit rate | well-formed | questions |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in evals:
            lines.append(
                f"| {e['phase']} | {e['when']} | {e['step']} | {e['accuracy']:.3f} | {e['rubric_hit_rate']:.3f} | "
                f"{e['well_formed_rate']:.3f} | {e['num_questions']} |"
            )
        examples = evals[-1].get("examples", [])
        if examples:
            lines += ["", f"Responses of the last evaluation ({evals[-1]['phase']}, {evals[-1]['when']}):", ""]
            for ex in examples:
                lines.append(f"- label `{ex['label']}`, accuracy {ex['accuracy']:.0f}: `{ex['response']!r}`")
    lines += live_eval_lines(run)
    lines += _baseline_lines(summary if summary is not None else report_summary(run))
    lines += ["", "## Plots", ""]
    if (run.report_dir / DURING_PLOT).is_file():
        lines.append(f"![Held-out accuracy during training]({DURING_PLOT})")
    for name, title in (
        ("reward", "Reward, accuracy, rubric hits"),
        ("throughput", "Throughput"),
        ("staleness", "Staleness"),
        ("queues", "Queue depth"),
    ):
        lines.append(f"![{title}]({name}.png)")
    lines += ["", f"Logs: `{run.logs}`. Config: `{run.config}`.", ""]
    return "\n".join(lines)
