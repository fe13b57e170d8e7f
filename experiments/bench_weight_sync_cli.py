"""`longtrace bench weight-sync` (registered by deploy/cli.py): a full push to one built-in engine vs a raw
broadcast of the same bytes."""

from __future__ import annotations

import argparse

from common.cli import Logs, SubParsers, bench, check_positive, print_result, user_errors


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add the benchmark. Keep imports inside the handlers."""
    b = bench(
        benches,
        "weight-sync",
        _bench,
        logs=Logs(level="INFO", json_level="WARNING"),
        help="GB/s of a full weight push to one built-in engine vs a raw broadcast of the same bytes (same group)",
    )
    b.add_argument("--hidden-size", type=int, default=768, help="model width (768 x 12 layers ~ 125M params)")
    b.add_argument("--num-layers", type=int, default=12, help="transformer layers")
    b.add_argument("--vocab-size", type=int, default=50000, help="vocabulary rows")
    b.add_argument("--rounds", type=int, default=3, help="timed push/raw pairs (median)")
    b.add_argument("--bucket-mb", type=int, default=512, help="bucket size of the push, MiB")
    b.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="group backend")


def _bench(args: argparse.Namespace) -> int:
    import logging

    from experiments.bench_weight_sync import run_weight_sync_bench

    logging.getLogger("transformers").setLevel(logging.ERROR)
    check_positive(args, "hidden_size", "num_layers", "vocab_size", "rounds", "bucket_mb")
    with user_errors():
        result = run_weight_sync_bench(
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            vocab_size=args.vocab_size,
            rounds=args.rounds,
            bucket_mb=args.bucket_mb,
            backend=args.backend,
        )
    print_result(result, args.json)
    return 0
