"""`longtrace learner [--config F] [--section.key value ...]`: the training loop, one process per torchrun rank.

    torchrun --nproc_per_node 2 -m learner.train_cli --config configs/debug/learner.toml

(or `torchrun ... $(which longtrace) learner ...`: learner/cli.py registers the same command). Without
torchrun it runs as a single rank. Heavy imports (torch, megatron, transformers) happen in the handler.
"""

from __future__ import annotations

import argparse

from common.cli import Logs, SubParsers, add_config, command, run_command


def register_train(commands: SubParsers, benches: SubParsers) -> None:
    """Add `learner` (call from learner/cli.py's `register`)."""
    parser = command(
        commands,
        "learner",
        _train,
        overrides=True,
        logs=Logs(ranked=True),
        help="train with GRPO + icepop from the scored stream (run under torchrun)",
        description="Config: TrainConfig (learner/train_config.py); override any field with --section.key value.",
    )
    add_config(parser, "TOML file with the TrainConfig sections")


def _train(args: argparse.Namespace) -> int:
    from common.config import load_config
    from learner.train_config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)

    from torch.distributed.elastic.multiprocessing.errors import record

    from learner.trainer import run

    record(run)(cfg)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry for `python -m learner.train_cli` (what torchrun launches when the CLI is not installed)."""
    run_command(register_train, ["learner"], argv)


if __name__ == "__main__":
    main()
