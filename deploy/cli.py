"""`longtrace`: one CLI whose subcommands are registered by each package's `cli` module.

Each `cli` module defines `register(commands, benches)` and imports nothing heavy at module level,
so `longtrace --help` stays fast: torch, megatron and transformers load inside the handlers.
Parsing, override flags, logging and exit codes are common/cli.py's (`run_cli`), the same for the
`python -m` modules the launcher runs.
"""

from __future__ import annotations

import argparse
import importlib

from common.cli import root_parser, run_cli

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
    "experiments.cluster_cli",
)


def build_parser() -> argparse.ArgumentParser:
    return root_parser(
        (importlib.import_module(name).register for name in COMMAND_MODULES),
        description="LongTrace: asynchronous RL with entity rubric rewards for long-context reasoning.",
    )


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), argv)


if __name__ == "__main__":
    main()
