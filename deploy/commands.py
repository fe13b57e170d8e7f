"""`longtrace` subcommands of deploy/: the local launcher and reports (registered by deploy/cli.py).

longtrace up CONFIG [--no-dashboard] [--section.key value ...]
longtrace report RUN_DIR
"""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add the launcher's subcommands. Keep imports inside the handlers."""
    up = commands.add_parser(
        "up",
        help="run the whole system on this machine (Redis, reward, engines, rollout workers, torchrun learner)",
        description="Start every process of CONFIG (an UpConfig TOML, e.g. configs/demo.toml), run its phases, show a "
        "live dashboard, write logs, metrics and a report to the run directory. Ctrl-C stops everything cleanly.",
        epilog="Overrides: --run_dir runs/x --learner.nproc_per_node 2 --phases.rl.steps 50 "
        "--learner.config.optim.lr 1e-3 --redis.url redis://host:6379/0 ...",
    )
    up.add_argument("config", help="UpConfig TOML file")
    up.add_argument(
        "--no-dashboard", action="store_true", help="print one line per learner step instead of the live panel"
    )
    up.set_defaults(func=_up, overrides=True)

    report = commands.add_parser(
        "report",
        help="PNG plots and report.md of a `longtrace up` run directory",
        description="Write RUN_DIR/report/: reward, accuracy and rubric hits over steps, throughput, staleness, "
        "queue depth, and a markdown summary with the held-out evaluations.",
    )
    report.add_argument("run_dir", help="run directory of `longtrace up`")
    report.set_defaults(func=_report)


def _up(args: argparse.Namespace) -> int:
    import logging

    from common.config import load_config
    from common.logs import setup_logging
    from deploy.launcher.config import UpConfig
    from deploy.launcher.up import run_up

    cfg = load_config(UpConfig, args.config, args.overrides)
    setup_logging(level="INFO", prefix="up ")
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the terminal shows the dashboard; the log file INFO
    return run_up(cfg, dashboard_mode="lines" if args.no_dashboard else None)


def _report(args: argparse.Namespace) -> int:
    from common.config import ConfigError
    from deploy.report import write_report

    try:
        path = write_report(args.run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    print(path)
    return 0
