"""Merge the report summaries of several `longtrace up` runs of one config (one per seed) into one results file.

    python -m experiments.demo_seeds runs/demo-seed0 runs/demo-seed1 runs/demo-seed2 --out docs/results/demo_seeds.json

Each run directory's report/summary.json (deploy/report.py) gives the held-out accuracies and the baselines; the
output keeps every seed and, per figure, the mean, the sample standard deviation over seeds and the min and max.
The gains are differences within a seed (paired), then summarised over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any


def _spread(values: list[float | None]) -> dict[str, Any]:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(xs) if len(xs) > 1 else None
    return {"mean": statistics.fmean(xs), "std": std, "min": min(xs), "max": max(xs), "n": len(xs)}


def merge(run_dirs: list[Path]) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    for run in run_dirs:
        summary = json.loads((run / "report" / "summary.json").read_text())
        config = json.loads((run / "config.json").read_text())
        phases = {p["phase"]: p for p in summary["phases"]}
        seeds[str(config["prepare"]["seed"])] = {
            "run_dir": str(run),
            "heldout": summary["heldout"],
            "baselines": summary["baselines"],
            "best_heuristic": summary["best_heuristic"],
            "rl_minus_sft": summary["rl_minus_sft"],
            "rl_minus_best_heuristic": summary["rl_minus_best_heuristic"],
            "distinct_cities_mean": summary["distinct_cities_mean"],
            "phase_wall_s": {name: p["wall_s"] for name, p in phases.items()},
        }
    per = list(seeds.values())
    names = sorted({k for s in per for k in s["baselines"]})
    return {
        "seeds": seeds,
        "heldout": {k: _spread([s["heldout"][k] for s in per]) for k in ("before", "after_sft", "after_rl")},
        "rl_minus_sft": _spread([s["rl_minus_sft"] for s in per]),
        "rl_minus_best_heuristic": _spread([s["rl_minus_best_heuristic"] for s in per]),
        "baselines": {k: _spread([s["baselines"].get(k) for s in per]) for k in names},
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo_seeds", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="`longtrace up` run directories with a report")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.run_dirs if not (r / "report" / "summary.json").is_file()]
    if missing:
        parser.error(f"run_dirs: no report/summary.json in {', '.join(missing)} (run `longtrace report RUN_DIR`)")
    result = merge(args.run_dirs)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("heldout", "rl_minus_sft", "rl_minus_best_heuristic")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
