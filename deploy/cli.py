"""`longtrace`: one CLI whose subcommands are registered by each package's `cli` module.

Each `cli` module defines `register(commands, benches)` and imports nothing heavy at module level,
so `longtrace --help` stays fast: torch, megatron and transformers load inside the handlers.
Handlers whose parser sets `overrides=True` receive the leftover `--section.key value` flags as
config overrides (see common/config.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from common.config import ConfigError

COMMAND_MODULES = (
    "broker.cli",
    "weights.cli",
    "reward_service.cli",
    "rollout_server.cli",
    "learner.cli",
    "datagen.cli",
    "deploy.commands",
    "experiments.fuzz_cli",
    "eval.cli",
    "experiments.chaos_cli",
    "experiments.ablate_cli",
    "experiments.bench_async_cli",
    "experiments.bench_weight_sync_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longtrace",
        description="LongTrace: asynchronous RL with entity rubric rewards for long-context reasoning.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser("bench", help="benchmarks that print one JSON object")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands, benches)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"longtrace: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
