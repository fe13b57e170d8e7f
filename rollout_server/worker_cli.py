"""`longtrace rollout worker`, `longtrace engine launch` and `longtrace bench rollout`.

rollout_server/cli.py calls `register_worker(commands, benches)` and, on its `engine` subcommand's
subparsers, `register_launch(engine_commands)`. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def register_worker(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    rollout = commands.add_parser("rollout", help="rollout workers: tasks in, generated groups out")
    sub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    worker = sub.add_parser(
        "worker",
        help="consume `tasks`, generate groups through the engines, publish them to `rollouts`",
        description="Overrides: --section.key value, e.g. --broker.redis_url redis://h:6379/0 "
        "--engines.urls '[\"http://e1:30000\"]' --router.max_inflight_per_engine 32 --processor deepseek_r1",
    )
    worker.add_argument("--config", help="TOML file of a RolloutConfig")
    worker.set_defaults(func=_worker, overrides=True)

    bench = benches.add_parser(
        "rollout", help="samples/s through Redis + worker + router over 2 built-in engines vs straight to them"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--num-groups", type=int, default=24, help="tasks per measured pass")
    bench.add_argument("--num-samples", type=int, default=4, help="samples per group")
    bench.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sample")
    bench.add_argument("--prompt-len", type=int, default=48, help="prompt tokens")
    bench.add_argument("--groups-in-flight", type=int, default=4, help="worker's max_groups_in_flight")
    bench.add_argument("--repeats", type=int, default=4, help="alternating passes of each path")
    bench.set_defaults(func=_bench)


def register_launch(engine_commands: argparse._SubParsersAction[Any]) -> None:
    launch = engine_commands.add_parser(
        "launch",
        help="start an engine (builtin or sglang) and keep it registered in the engine registry",
        description="Settings are flags of LaunchConfig: --backend builtin|sglang --model_path P --tp_size N "
        "--mem_fraction_static F --context_length L --host H --port P --broker.redis_url URL --dry_run "
        '--extra_args \'["--flag", "value"]\'',
    )
    launch.add_argument("--config", help="TOML file of a LaunchConfig")
    launch.set_defaults(func=_launch, overrides=True)


def _worker(args: argparse.Namespace) -> int:
    import asyncio

    from broker.factory import connect
    from common.config import load_config
    from common.logs import setup_logging
    from rollout_server.worker.config import RolloutConfig
    from rollout_server.worker.worker import run_worker

    cfg = load_config(RolloutConfig, args.config, args.overrides)
    setup_logging(prefix="rollout ")
    broker = connect(cfg.broker)
    try:
        asyncio.run(run_worker(cfg, broker))
    finally:
        broker.close()
    return 0


def _launch(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.logs import setup_logging
    from rollout_server.launch import LaunchConfig, launch

    cfg = load_config(LaunchConfig, args.config, args.overrides)
    setup_logging(prefix="launch ")
    return launch(cfg)


def _bench(args: argparse.Namespace) -> int:
    import json

    from common.config import ConfigError
    from common.logs import setup_logging
    from rollout_server.bench_rollout import BenchSpec, run_bench

    for flag in ("num_groups", "num_samples", "max_new_tokens", "prompt_len", "groups_in_flight", "repeats"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    setup_logging(level="WARNING")
    result = run_bench(
        BenchSpec(
            num_groups=args.num_groups,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            prompt_len=args.prompt_len,
            groups_in_flight=args.groups_in_flight,
            repeats=args.repeats,
        )
    )
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def _standalone(prog: str, handler: Callable[[argparse.Namespace], int], argv: list[str] | None) -> None:
    """`python -m ...` entry: `--config F` plus `--section.key value` overrides, as under `longtrace`."""
    from common.config import ConfigError

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="TOML config file")
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    try:
        code = handler(args)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def worker_main(argv: list[str] | None = None) -> None:
    """`python -m rollout_server.worker`: the same as `longtrace rollout worker`."""
    _standalone("python -m rollout_server.worker", _worker, argv)


def launch_main(argv: list[str] | None = None) -> None:
    """`python -m rollout_server.launch`: the same as `longtrace engine launch`."""
    _standalone("python -m rollout_server.launch", _launch, argv)
