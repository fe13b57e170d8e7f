"""`longtrace learner [--config F] [--section.key value ...]`: the training loop, one process per torchrun rank.

    torchrun --nproc_per_node 2 -m learner.train_cli --config configs/debug/learner.toml

(or `torchrun ... $(which longtrace) learner ...` once learner/cli.py calls `register_train`). Without
torchrun it runs as a single rank. Heavy imports (torch, megatron, transformers) happen in the handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register_train(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add `learner` (call from learner/cli.py's `register`)."""
    parser = commands.add_parser(
        "learner",
        help="train with GRPO + icepop from the scored stream (run under torchrun)",
        description="Config: TrainConfig (learner/train_config.py); override any field with --section.key value.",
    )
    parser.add_argument("--config", default=None, help="TOML file with the TrainConfig sections")
    parser.set_defaults(func=_train, overrides=True)


def _train(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.logs import setup_logging
    from learner.train_config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    rank = os.environ.get("RANK", "0")
    # Rank 0 logs at the configured level; the others only warnings and errors.
    setup_logging(level=None if rank == "0" else "WARNING", prefix=f"[rank{rank}] ")

    from torch.distributed.elastic.multiprocessing.errors import record

    from learner.trainer import run

    record(run)(cfg)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry for `python -m learner.train_cli` (what torchrun launches when the CLI is not installed)."""
    from common.config import ConfigError

    parser = argparse.ArgumentParser(prog="learner")
    commands = parser.add_subparsers(dest="command", required=True)
    register_train(commands, commands)  # no benches here
    args, rest = parser.parse_known_args(["learner", *(sys.argv[1:] if argv is None else argv)])
    args.overrides = rest
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"learner: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
