"""`longtrace weight-sync catch-up`: load the newest HF export into a late engine (registered by deploy/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys

from common.cli import SubParsers, command
from common.config import ConfigError


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add the weight hand-off's subcommands. Keep imports inside the handlers."""
    ws = commands.add_parser("weight-sync", help="weight sync tools")
    ws_cmds = ws.add_subparsers(dest="weight_sync_command", metavar="ACTION", required=True)
    catch = command(
        ws_cmds,
        "catch-up",
        _catch_up,
        help="load the newest HF export into an engine (run before a late engine is registered)",
    )
    catch.add_argument("--engine", required=True, help="engine base URL, http://host:port")
    catch.add_argument("--export-dir", required=True, help="the learner's --weight_sync.export_dir")
    catch.add_argument("--timeout-s", type=float, default=600.0, help="timeout of the load")


def _catch_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weights.engine_client import EngineCallError
    from weights.exports import catch_up

    if not Path(args.export_dir).is_dir():
        raise ConfigError(f"--export-dir {args.export_dir}: no such directory")
    try:
        version = catch_up(args.engine, args.export_dir, args.timeout_s)
    except EngineCallError as e:
        print(f"longtrace: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"engine": args.engine, "version": version}))
    return 0
