"""`longtrace bench weight-sync` (registered by deploy/cli.py): a full push to one built-in engine vs a raw
broadcast of the same bytes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from common.config import ConfigError


def register(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add the benchmark. Keep imports inside the handlers."""
    bench = benches.add_parser(
        "weight-sync",
        help="GB/s of a full weight push to one built-in engine vs a raw broadcast of the same bytes (same group)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--hidden-size", type=int, default=768, help="model width (768 x 12 layers ~ 125M params)")
    bench.add_argument("--num-layers", type=int, default=12, help="transformer layers")
    bench.add_argument("--vocab-size", type=int, default=50000, help="vocabulary rows")
    bench.add_argument("--rounds", type=int, default=3, help="timed push/raw pairs (median)")
    bench.add_argument("--bucket-mb", type=int, default=512, help="bucket size of the push, MiB")
    bench.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="group backend")
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import logging

    from common.logs import setup_logging
    from experiments.bench_weight_sync import run_weight_sync_bench

    setup_logging("WARNING" if args.json else "INFO")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for flag in ("hidden_size", "num_layers", "vocab_size", "rounds", "bucket_mb"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        result = run_weight_sync_bench(
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            vocab_size=args.vocab_size,
            rounds=args.rounds,
            bucket_mb=args.bucket_mb,
            backend=args.backend,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
