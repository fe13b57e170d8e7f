"""What a cluster run did (experiments/cluster_scenario.py): the chaos bench's accounting of every admitted group,
read through its Probe from this host over the bridge, and the run's speed and weight-push times from the learner's
metrics."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from experiments.chaos_accounting import Sources, account


def read_retried(fn: Any, attempts: int = 5, wait_s: float = 1.0) -> Any:
    """`fn()` (a probe read: None when it failed), tried again a few times: the probe never retries (it must not
    block during a fault), and after a partition its pooled connection may be one the partition broke (a CI run read
    the dead stream as unreadable once, right after the link healed)."""
    for attempt in range(attempts):
        got = fn()
        if got is not None or attempt == attempts - 1:
            return got
        time.sleep(wait_s)
    return None


def account_run(probe: Any, run_dir: Path, steps: int) -> dict[str, Any]:
    """The chaos bench's accounting of every admitted group, and the run's speed and weight-push times."""
    from broker.base import TASKS
    from learner.metrics import lineage_lines, read_metrics

    try:
        lines: list[dict[str, Any]] | None = read_metrics(run_dir)
    except (OSError, ValueError):
        lines = None
    letters = read_retried(probe.dead_letters)
    acc = account(
        Sources(
            admitted=read_retried(lambda: probe.published(TASKS)),
            metrics_lines=lines,
            dead_group_ids=None if letters is None else {x.group_id for x in letters if x.group_id},
            pending_group_ids=read_retried(probe.entry_group_ids),
            steps=steps,
        )
    )
    lineage = lineage_lines(lines or [])
    ordered = [lineage[s] for s in sorted(lineage)]
    times = [float(m["time_s"]) for m in ordered]
    pushes = [float(m["weight_sync/total_s"]) for m in ordered if m.get("weight_sync/ok") == 1.0]
    return {
        **acc.to_json(),
        "steps": len(ordered),
        "steps_per_min": round(60 * (len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else None,
        "push_s_median": round(statistics.median(pushes), 4) if pushes else None,
        "pushes_ok": len(pushes),
        "pushes_failed": sum(1 for m in ordered if m.get("weight_sync/ok") == 0.0),
        "engines_per_push": sorted({m.get("weight_sync/num_engines") for m in ordered}),
        "finished": len(ordered) == steps and acc.conservation_ok,
    }


def link_label(run: dict[str, Any]) -> str:
    if run["shaper"] == "off":
        return "clean"
    return f"delay {run['delay_ms']:g} ms +- {run['jitter_ms']:g} ms, loss {run['loss_pct']:g} % ({run['shaper']})"
