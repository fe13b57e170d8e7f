"""`longtrace` subcommands of learner (registered by deploy/cli.py)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add this package's subcommands and benchmarks. Keep imports inside the handlers."""
