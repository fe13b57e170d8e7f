"""The async bench's result over both runs: the speedup of the async run against the ideal pipeline (sum of the
sync run's stage busy medians over their largest), the rounding of the per-run figures in the JSON, and the short
table `longtrace bench async` prints without --json.
"""

from __future__ import annotations

import math
from typing import Any

from experiments.bench_async_measure import STAGES

TARGET_EFFICIENCY = 0.9


def combine(sync: dict[str, Any], asyn: dict[str, Any]) -> dict[str, Any]:
    busy = sync["busy_s_per_step"]
    ideal = sum(busy.values()) / max(busy.values()) if max(busy.values()) > 0 else math.nan
    speedup = asyn["steps_per_min"] / sync["steps_per_min"]
    return {
        "sync_steps_per_min": round(sync["steps_per_min"], 3),
        "async_steps_per_min": round(asyn["steps_per_min"], 3),
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "efficiency": round(speedup / ideal, 3),
        "target_efficiency": TARGET_EFFICIENCY,
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
        f"speedup {result['speedup']:.2f}  ideal {result['ideal_speedup']:.2f}  efficiency {result['efficiency']:.2f} "
        f"(target >= {TARGET_EFFICIENCY})   busy s/step of each stage are medians; the async run's stages overlap"
    )
    return "\n".join(lines)
