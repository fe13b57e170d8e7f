"""`longtrace` subcommands of deploy/: the local launcher and reports (registered by deploy/cli.py)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add the launcher's subcommands. Keep imports inside the handlers."""
