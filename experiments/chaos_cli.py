"""`longtrace bench chaos`: run the local `longtrace up` through each fault scenario and check that every admitted
group is accounted for (registered by deploy/cli.py).

longtrace bench chaos [--json] [--config configs/bench/chaos.toml] [--scenarios '["kills", "judge_outage"]']
                      [--faults '["engine"]'] [--up.key value ...]

Prints one JSON object: ok, scenarios, kills, groups_admitted, groups_trained, groups_dropped_stale,
groups_dead_lettered, groups_pending_end, groups_lost, groups_duplicated, duplicates_counted_from, conservation_ok,
finished (summed or and-ed over the scenarios), and each scenario's run under `runs` (experiments/chaos.py). Exit
status 1 unless ok (per scenario: nothing lost or duplicated, conservation holds, every injection recovered from,
the scenario's own check holds, the learner finished).
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
        help="kills, judge outage, long generations, oversized output, rejected tasks, a learner crash loop and a "
        "regex bomb, each in a local run; nothing lost or doubled",
        description="Run the local system (an UpConfig under [up]) once per scenario with its fault; account for "
        "every admitted group from Redis's dedup keys, metrics.jsonl, the dead stream and the streams' entries.",
        epilog='Overrides: --scenarios \'["kills"]\' --faults \'["reward_worker", "engine"]\' --up.run_dir '
        "runs/chaos-2 --up.phases.rl.steps 16 --scenario_steps 24 --warmup_steps 2 ...",
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
