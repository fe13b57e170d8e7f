"""`longtrace bench async` (registered by deploy/cli.py): sync vs async RL through the whole local system.

longtrace bench async [--config configs/bench/async.toml] [--json] [--section.key value ...]

Prints one JSON object (--json) or a short table: sync_steps_per_min, async_steps_per_min, speedup, ideal_speedup
(a bound: experiments/bench_async_summary.py), ratio = speedup / ideal_speedup, and per-stage busy seconds per step
of both runs (experiments/bench_async_measure.py says how each is
measured).
"""

from __future__ import annotations

import argparse

from common.cli import SubParsers, add_config, bench, print_result


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add `bench async`. Keep imports inside the handler."""
    b = bench(
        benches,
        "async",
        _bench,
        json_help="print only the JSON result",
        overrides=True,
        help="the same RL run with max_staleness 0 and 2 against a delayed judge: speedup vs the ideal pipeline",
        description="Two `longtrace up` runs (a warm start and RL at max_staleness 0, then RL at max_staleness 2 from "
        "the same weights) against a stub judge that takes --judge.delay_s per call, --judge.concurrency at once.",
        epilog="Overrides: --steps 12 --judge.delay_s 1.0 --judge.concurrency 8 --async_max_staleness 2 "
        "--up.learner.config.data.groups_per_step 4 --model_path runs/demo/phases/sft/exports/v300 --dataset_path ...",
    )
    add_config(b, "BenchAsyncConfig TOML (default: configs/bench/async.toml)")


def _bench(args: argparse.Namespace) -> int:
    import json
    import sys

    from common.config import load_config
    from experiments.bench_async import DEFAULT_CONFIG, BenchAsyncConfig, BenchError, run_bench
    from experiments.bench_async_summary import format_table

    cfg = load_config(BenchAsyncConfig, args.config or DEFAULT_CONFIG, args.overrides)
    try:
        result = run_bench(cfg, progress=sys.stderr)
    except BenchError as e:
        print(f"longtrace bench async: {e}", file=sys.stderr)
        return 1
    print_result(result, args.json, text=lambda r: format_table(r) + "\n" + json.dumps(r, indent=2))
    return 0
