"""`longtrace bench async` (registered by deploy/cli.py): sync vs async RL through the whole local system.

longtrace bench async [--config configs/bench/async.toml] [--json] [--section.key value ...]

Prints one JSON object (--json) or a short table: sync_steps_per_min, async_steps_per_min, speedup, ideal_speedup,
efficiency and per-stage busy seconds per step of both runs (experiments/bench_async.py says how each is measured).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add `bench async`. Keep imports inside the handler."""
    bench = benches.add_parser(
        "async",
        help="the same RL run with max_staleness 0 and 2 against a delayed judge: speedup vs the ideal pipeline",
        description="Two `longtrace up` runs (a warm start and RL at max_staleness 0, then RL at max_staleness 2 from "
        "the same weights) against a stub judge that takes --judge.delay_s per call, --judge.concurrency at once.",
        epilog="Overrides: --steps 12 --judge.delay_s 1.0 --judge.concurrency 8 --async_max_staleness 2 "
        "--up.learner.config.data.groups_per_step 4 --model_path runs/demo/phases/sft/exports/v300 --dataset_path ...",
    )
    bench.add_argument("--config", default=None, help="BenchAsyncConfig TOML (default: configs/bench/async.toml)")
    bench.add_argument("--json", action="store_true", help="print only the JSON result")
    bench.set_defaults(func=_bench, overrides=True)


def _bench(args: argparse.Namespace) -> int:
    import json
    import sys

    from common.config import load_config
    from common.logs import setup_logging
    from experiments.bench_async import DEFAULT_CONFIG, BenchAsyncConfig, BenchError, format_table, run_bench

    cfg = load_config(BenchAsyncConfig, args.config or DEFAULT_CONFIG, args.overrides)
    setup_logging("WARNING")
    try:
        result = run_bench(cfg, progress=sys.stderr)
    except BenchError as e:
        print(f"longtrace bench async: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else format_table(result) + "\n" + json.dumps(result, indent=2))
    return 0
