"""The async bench's result over both runs: the speedup of the async run against an ideal that bounds it, the
rounding of the per-run figures in the JSON, and the short table `longtrace bench async` prints without --json.

The ideal is built from resources, not stage occupancy: whatever overlaps, an async step cannot be shorter than
the work it must put through its busiest resource, measured in the async run itself:
- the judge: its slot-seconds per step / its concurrency (`judge_work_s_per_step`);
- the CPU: the machine's busy CPU seconds per step / its cores (generation and training compete for it, and on a
  shared machine other processes take their share: `others_cpu_s_per_step`);
- the learner: training then weight sync, one after the other (`learner_s_per_step`).
`bound_step_s` is the largest; `ideal_speedup` = sync step / bound_step_s and `ratio` = speedup / ideal_speedup
= bound_step_s / async step <= 1 (above 1 would mean a resource was missed). The stage-occupancy ideal of the
first version (sum of the sync run's stage medians over the largest) is kept as `occupancy_ideal_speedup`: it
is not a bound (a stage whose slots are not full can share its time), and measured runs exceeded it.
"""

from __future__ import annotations

import math
from typing import Any

from experiments.bench_async_measure import STAGES

TARGET_EFFICIENCY = 0.9


def bound_step_s(run: dict[str, Any], cores: int) -> dict[str, float]:
    """The per-resource lower bounds on one step of `run` (seconds), by name."""
    return {
        "judge": run["judge_work_s_per_step"],
        "cpu": run["machine_cpu_s_per_step"] / cores if not math.isnan(run["machine_cpu_s_per_step"]) else 0.0,
        "learner": run["learner_s_per_step"],
    }


def combine(sync: dict[str, Any], asyn: dict[str, Any], cores: int) -> dict[str, Any]:
    busy = sync["busy_s_per_step"]
    occupancy = sum(busy.values()) / max(busy.values()) if max(busy.values()) > 0 else math.nan
    speedup = asyn["steps_per_min"] / sync["steps_per_min"]
    bounds = bound_step_s(asyn, cores)
    bound = max(bounds.values())
    ideal = sync["step_s"] / bound if bound > 0 else math.nan
    return {
        "sync_steps_per_min": round(sync["steps_per_min"], 3),
        "async_steps_per_min": round(asyn["steps_per_min"], 3),
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "ratio": round(speedup / ideal, 3),
        "target_ratio": TARGET_EFFICIENCY,
        "bound_step_s": round(bound, 3),
        "bound_by": max(bounds, key=lambda k: bounds[k]),
        "bounds_s": {k: round(v, 3) for k, v in bounds.items()},
        "cores": cores,
        "others_cpu_s_per_step": round(asyn["machine_cpu_s_per_step"] - asyn["cpu_s_per_step"], 3),
        "occupancy_ideal_speedup": round(occupancy, 3),
    }


def rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return x


def format_table(result: dict[str, Any]) -> str:
    """The short human-readable view of a result."""
    lines = [f"{'':14}{'steps/min':>10}{'step s':>8}" + "".join(f"{s:>12}" for s in STAGES) + f"{'stale drop':>11}"]
    for mode in ("sync", "async"):
        r = result[mode]
        busy = r["busy_s_per_step"]
        lines.append(
            f"{mode:14}{r['steps_per_min']:>10.2f}{r['step_s']:>8.2f}"
            + "".join(f"{busy[s]:>12.2f}" for s in STAGES)
            + f"{r['groups_dropped_stale']:>11}"
        )
    lines.append(
        f"speedup {result['speedup']:.2f}  ideal {result['ideal_speedup']:.2f} (bound: {result['bound_by']}, "
        f"{result['bound_step_s']:.2f} s/step)  ratio {result['ratio']:.2f} (target >= {TARGET_EFFICIENCY})   "
        "busy s/step of each stage are medians; the async run's stages overlap"
    )
    return "\n".join(lines)
