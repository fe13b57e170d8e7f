"""`longtrace` subcommands of the weight sync (the lead wires `register_weight_sync` into learner/cli.py):
`bench weight-sync` and `weight-sync catch-up` (load the newest HF export into a late engine)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.config import ConfigError


def register_weight_sync(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add the weight-sync subcommands and benchmark. Keep imports inside the handlers."""
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

    ws = commands.add_parser("weight-sync", help="weight sync tools")
    ws_cmds = ws.add_subparsers(dest="weight_sync_command", metavar="ACTION", required=True)
    catch = ws_cmds.add_parser(
        "catch-up", help="load the newest HF export into an engine (run before a late engine is registered)"
    )
    catch.add_argument("--engine", required=True, help="engine base URL, http://host:port")
    catch.add_argument("--export-dir", required=True, help="the learner's --weight_sync.export_dir")
    catch.add_argument("--timeout-s", type=float, default=600.0, help="timeout of the load")
    catch.set_defaults(func=_catch_up)


def _bench(args: argparse.Namespace) -> int:
    import logging

    from broker.logs import setup_logging
    from learner.weight_sync.bench import run_weight_sync_bench

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


def _catch_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from broker.logs import setup_logging
    from learner.weight_sync.client import EngineCallError
    from learner.weight_sync.disk import catch_up

    setup_logging()
    if not Path(args.export_dir).is_dir():
        raise ConfigError(f"--export-dir {args.export_dir}: no such directory")
    try:
        version = catch_up(args.engine, args.export_dir, args.timeout_s)
    except EngineCallError as e:
        print(f"longtrace: error: {e}")
        return 1
    print(json.dumps({"engine": args.engine, "version": version}))
    return 0
