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

from common.cli import Logs, SubParsers, add_config, bench, print_result

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench" / "chaos.toml"


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add `bench chaos`. Keep imports inside the handler."""
    b = bench(
        benches,
        "chaos",
        _bench,
        json_help="print only the JSON result",
        overrides=True,
        logs=Logs(prefix="chaos ", level="INFO"),
        help="kill -9 a reward worker, rollout worker, engine, the learner and Redis in turn; nothing lost or doubled",
        description="Run the local system (an UpConfig under [up]) and SIGKILL then restart each process kind in "
        "turn; account every admitted group against the final checkpoint and the Redis streams.",
        epilog='Overrides: --faults \'["reward_worker", "engine"]\' --up.run_dir runs/chaos-2 '
        "--up.phases.rl.steps 16 --warmup_steps 2 ...",
    )
    add_config(b, "ChaosConfig TOML (default: %(default)s)", default=str(DEFAULT_CONFIG))


def _bench(args: argparse.Namespace) -> int:
    import logging

    from experiments.chaos import load_chaos_config, run_chaos

    cfg = load_chaos_config(args.config, args.overrides)
    if args.json:
        logging.getLogger().handlers[0].setLevel(logging.ERROR)  # the run's log file keeps INFO
    result = run_chaos(cfg)
    print_result(result, as_json=True)
    return 0 if result["ok"] else 1
