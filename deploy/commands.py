"""`longtrace` subcommands of deploy/: the local launcher and reports (registered by deploy/cli.py).

longtrace up CONFIG [--no-dashboard] [--section.key value ...]    (or: longtrace up --config CONFIG ...)
longtrace report RUN_DIR
"""

from __future__ import annotations

import argparse

from common.cli import QUIET, Logs, SubParsers, add_config, command, user_errors


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add the launcher's subcommands. Keep imports inside the handlers."""
    up = command(
        commands,
        "up",
        _up,
        overrides=True,
        logs=Logs(prefix="up ", level="INFO"),
        help="run the whole system on this machine (Redis, reward, engines, rollout workers, torchrun learner)",
        description="Start every process of CONFIG (an UpConfig TOML, e.g. configs/demo.toml), run its phases, show a "
        "live dashboard, write logs, metrics and a report to the run directory. Ctrl-C stops everything cleanly.",
        epilog="Overrides: --run_dir runs/x --learner.nproc_per_node 2 --phases.rl.steps 50 "
        "--learner.config.optim.lr 1e-3 --redis.url redis://host:6379/0 ...",
    )
    add_config(up, "UpConfig TOML file", positional=True)
    up.add_argument(
        "--no-dashboard", action="store_true", help="print one line per learner step instead of the live panel"
    )

    report = command(
        commands,
        "report",
        _report,
        logs=QUIET,
        help="PNG plots and report.md of a `longtrace up` run directory",
        description="Write RUN_DIR/report/: reward, accuracy and rubric hits over steps, throughput, staleness, "
        "queue depth, and a markdown summary with the held-out evaluations.",
    )
    report.add_argument("run_dir", help="run directory of `longtrace up`")


def _up(args: argparse.Namespace) -> int:
    import logging

    from common.config import load_config
    from deploy.launcher.config import UpConfig
    from deploy.launcher.up import run_up

    cfg = load_config(UpConfig, args.config, args.overrides)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the terminal shows the dashboard; the log file INFO
    return run_up(cfg, dashboard_mode="lines" if args.no_dashboard else None)


def _report(args: argparse.Namespace) -> int:
    from deploy.report import write_report

    with user_errors():
        path = write_report(args.run_dir)
    print(path)
    return 0
