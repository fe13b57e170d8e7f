"""`longtrace ablate` and `longtrace bench ablation` (registered by deploy/cli.py through COMMAND_MODULES).

longtrace ablate CONFIG [--section.key value ...]         runs, writes OUT/ablation.json and OUT/report/
longtrace ablate --config CONFIG [--section.key value ...]  the same
longtrace bench ablation [--config CONFIG] [--json] [--section.key value ...]   the same; prints one JSON object

CONFIG is an AblateConfig TOML (configs/ablate.toml; configs/debug/ablate.toml is CI-sized). A claim of the paper
that does not hold on this task is a result, not an error: the JSON's `replicates` verdicts (printed one per claim)
say which, next to the curves (exit 0); a run that fails exits 1.
"""

from __future__ import annotations

import argparse
from typing import Any

from common.cli import Logs, SubParsers, add_config, bench, command, print_result

DEFAULT_CONFIG = "configs/ablate.toml"


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add `ablate` and `bench ablation`. Keep imports inside the handlers."""
    ablate = command(
        commands,
        "ablate",
        _ablate,
        overrides=True,
        logs=Logs(prefix="ablate ", level="INFO"),
        help="the demo task under reward variants (outcome only, positive-only rubric, rubric on every sample)",
        description="Per seed: prepare + SFT once, then each variant's RL phase from the same SFT export; held-out "
        "accuracy over steps, rubric hits, ill-formed rate and a hacking indicator per variant, with the spread "
        "over seeds. Writes OUT/ablation.json and OUT/report/ (variants plot).",
        epilog="Overrides: --seeds [0,1] --up.phases.rl.steps 60 --eval_every_steps 20 --eta_sweep [0.1,0.5] "
        "--max_parallel 2 --out_dir runs/ablate-x",
    )
    add_config(ablate, "AblateConfig TOML (e.g. configs/ablate.toml)", positional=True)

    b = bench(
        benches,
        "ablation",
        _bench,
        json_help="print only the JSON result",
        overrides=True,
        logs=Logs(prefix="ablate ", level="INFO", json_level="WARNING"),
        help="run the reward ablation and print one JSON object (per-variant figures, direction checks)",
    )
    add_config(b, f"AblateConfig TOML (default {DEFAULT_CONFIG})", default=DEFAULT_CONFIG)


def _run(path: str, overrides: list[str], quiet: bool) -> dict[str, Any]:
    import logging

    from experiments.ablate import load, run_ablation
    from experiments.ablate_report import write_ablation_report

    cfg = load(path, overrides)
    logging.getLogger("experiments.ablate").setLevel(logging.WARNING if quiet else logging.INFO)
    summary = run_ablation(cfg)
    summary["report"] = str(write_ablation_report(cfg.out_dir))
    return summary


def _failed(e: RuntimeError) -> int:
    import sys

    print(f"longtrace ablate: {e}", file=sys.stderr)
    return 1


def _ablate(args: argparse.Namespace) -> int:
    try:
        summary = _run(args.config, args.overrides, quiet=False)
    except RuntimeError as e:
        return _failed(e)
    from experiments.ablate_report import ablation_table

    print(ablation_table(summary))
    for cid, r in summary["replicates"].items():
        print(f"{cid}: {r['verdict']} ({r['claim']})")
    print(f"report: {summary['report']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    try:
        summary = _run(args.config, args.overrides, quiet=args.json)
    except RuntimeError as e:
        return _failed(e)
    print_result(summary, args.json, text=lambda r: json.dumps(r, indent=2))
    return 0
