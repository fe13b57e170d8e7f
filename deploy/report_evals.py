"""The in-training held-out evaluations in `longtrace report` (RUN_DIR/phases/<phase>/evals.jsonl, written by
deploy/launcher/live_eval.py): the curve (heldout_during.png), its table in report.md and summary.json's
`heldout.during_rl`.

Their steps are the phase's own learner steps. They ran on the serving engines concurrently with the rollouts,
so the weights may have advanced during one: each line carries the policy versions its samples were generated
under. A failed eval is listed as failed and never plotted as an accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.launcher.rundir import RunDir

PLOT = "heldout_during.png"


def live_phases(run: RunDir) -> list[str]:
    """The phases that have in-training evals, in run order."""
    return [p for p in run.phase_names() if run.live_evals(p)]


def during_rl(run: RunDir) -> list[dict[str, Any]]:
    """`[{step, accuracy}]` of the succeeded in-training evals of the last RL phase that has any (as `after_rl`
    is the last RL phase's); [] when none."""
    kinds = {e["phase"]: e.get("kind") for e in run.phase_events()}
    for phase in reversed([p for p in live_phases(run) if kinds.get(p) == "rl"]):
        done = [e for e in run.live_evals(phase) if e.get("status") == "ok"]
        if done:
            return [{"step": e["step"], "accuracy": e["accuracy"]} for e in done]
    return []


def plot_live_evals(plt: Any, run: RunDir, path: Path) -> bool:
    """Accuracy vs learner step per phase, with the phase's before / after evals at its ends; False (no file)
    when the run has no in-training evals."""
    phases = live_phases(run)
    if not phases:
        return False
    fig, ax = plt.subplots(figsize=(9, 4))
    labels: set[str] = set()

    def once(label: str) -> str | None:
        new = label not in labels
        labels.add(label)
        return label if new else None

    for phase in phases:
        lines = run.live_evals(phase)
        ok = [e for e in lines if e.get("status") == "ok"]
        (curve,) = ax.plot(
            [e["step"] for e in ok], [e["accuracy"] for e in ok], marker="o", label=f"{phase}: during training"
        )
        steps = run.metrics(phase)
        ends = [e for e in run.evals() if e["phase"] == phase and e["when"] in ("before", "after")]
        if ends and steps:
            ax.scatter(
                [0 if e["when"] == "before" else steps[-1]["step"] for e in ends],
                [e["accuracy"] for e in ends],
                marker="D",
                edgecolors=curve.get_color(),
                facecolors="none",
                label=once("before / after the phase ([eval] max_questions)"),
            )
        for e in lines:
            if e.get("status") != "ok":
                ax.axvline(e["step"], color="tab:red", ls=":", lw=1, label=once("failed eval"))
    ax.set_xlabel("learner step of the phase")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("held-out accuracy during training (serving engines, concurrently with rollouts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def live_eval_lines(run: RunDir) -> list[str]:
    """The report.md section: one row per in-training eval (failed ones with their error)."""
    phases = live_phases(run)
    if not phases:
        return []
    lines = ["", "## Held-out evaluation during training", ""]
    lines += [
        "Evaluated on the serving engines, concurrently with rollouts; the weights may advance during an eval, so "
        "each row gives the policy versions its samples were generated under.",
        "",
        "| phase | step | status | accuracy | rubric mean | policy versions | questions | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase in phases:
        for e in run.live_evals(phase):
            if e.get("status") == "ok":
                cells = f"ok | {e['accuracy']:.3f} | {e['rubric_mean']:.3f}"
            else:
                cells = f"failed: {e.get('error', '')} | - | -"
            versions = f"{e.get('policy_version_min')}..{e.get('policy_version_max')}"
            lines.append(
                f"| {phase} | {e['step']} | {cells} | {versions} | {e.get('num_questions') or '-'} | "
                f"{e['wall_s']:.1f}s |"
            )
    return lines
