"""`longtrace bench chaos`: kill -9 each process of a local `longtrace up` in turn and check the delivery
guarantees (registered by deploy/cli.py).

longtrace bench chaos [--json] [--config configs/bench/chaos.toml] [--faults '["engine"]'] [--up.key value ...]

Prints one JSON object: ok, kills, groups_admitted, groups_trained, groups_lost, groups_duplicated, recovery_s per
fault, and the details (experiments/chaos.py). Exit status 1 unless ok (nothing lost, duplicated or left pending, every
fault recovered, the run finished).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench" / "chaos.toml"


def register(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add `bench chaos`. Keep imports inside the handler."""
    bench = benches.add_parser(
        "chaos",
        help="kill -9 a reward worker, rollout worker, engine, the learner and Redis in turn; nothing lost or doubled",
        description="Run the local system (an UpConfig under [up]) and SIGKILL then restart each process kind in "
        "turn; account every admitted group against the final checkpoint and the Redis streams.",
        epilog='Overrides: --faults \'["reward_worker", "engine"]\' --up.run_dir runs/chaos-2 '
        "--up.phases.rl.steps 16 --warmup_steps 2 ...",
    )
    bench.add_argument("--json", action="store_true", help="print only the JSON result")
    bench.add_argument("--config", default=str(DEFAULT_CONFIG), help="ChaosConfig TOML (default: %(default)s)")
    bench.set_defaults(func=_bench, overrides=True)


def _bench(args: argparse.Namespace) -> int:
    import json
    import logging

    from common.logs import setup_logging
    from experiments.chaos import load_chaos_config, run_chaos

    cfg = load_chaos_config(args.config, args.overrides)
    setup_logging(level="INFO", prefix="chaos ")
    if args.json:
        logging.getLogger().handlers[0].setLevel(logging.ERROR)  # the run's log file keeps INFO
    result = run_chaos(cfg)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1
