"""`longtrace rollout worker`, `longtrace engine launch` and `longtrace bench rollout`.

rollout_server/cli.py calls `register_worker(commands, benches)` and, on its `engine` subcommand's
subparsers, `register_launch(engine_commands)`. Heavy imports stay inside the handlers.
`python -m rollout_server.worker` and `python -m rollout_server.launch` run the same commands.
"""

from __future__ import annotations

import argparse

from common.cli import Logs, SubParsers, add_config, bench, check_positive, command, print_result


def register_worker(commands: SubParsers, benches: SubParsers) -> None:
    rollout = commands.add_parser("rollout", help="rollout workers: tasks in, generated groups out")
    sub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    worker = command(
        sub,
        "worker",
        _worker,
        overrides=True,
        logs=Logs(prefix="rollout "),
        help="consume `tasks`, generate groups through the engines, publish them to `rollouts`",
        description="Overrides: --section.key value, e.g. --broker.redis_url redis://h:6379/0 "
        "--engines.urls '[\"http://e1:30000\"]' --router.max_inflight_per_engine 32 --processor deepseek_r1",
    )
    add_config(worker, "TOML file of a RolloutConfig")

    b = bench(
        benches,
        "rollout",
        _bench,
        help="samples/s of long-prompt groups through Redis + worker + router, prefix sharing on vs off, and vs direct engine calls",
    )
    b.add_argument("--num-groups", type=int, default=8, help="tasks per measured pass")
    b.add_argument("--num-samples", type=int, default=8, help="samples per group")
    b.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample")
    b.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens (long: prefill is what sharing saves)")
    b.add_argument("--groups-in-flight", type=int, default=2, help="worker's max_groups_in_flight")
    b.add_argument(
        "--repeats", type=int, default=4, help="alternating passes of each path (worker_vs_direct: their median)"
    )


def register_launch(engine_commands: SubParsers) -> None:
    launch = command(
        engine_commands,
        "launch",
        _launch,
        overrides=True,
        logs=Logs(prefix="launch "),
        help="start an engine (builtin or sglang) and keep it registered in the engine registry",
        description="Settings are flags of LaunchConfig: --backend builtin|sglang --model_path P --tp_size N "
        "--mem_fraction_static F --context_length L --host H --port P --broker.redis_url URL --dry_run "
        '--extra_args \'["--flag", "value"]\'',
    )
    add_config(launch, "TOML file of a LaunchConfig")


def _worker(args: argparse.Namespace) -> int:
    import asyncio

    from broker.factory import connect
    from common.config import load_config
    from rollout_server.worker.config import RolloutConfig
    from rollout_server.worker.worker import run_worker

    cfg = load_config(RolloutConfig, args.config, args.overrides)
    broker = connect(cfg.broker)
    broker.attach_run("rollout worker")
    try:
        asyncio.run(run_worker(cfg, broker))
    finally:
        broker.close()
    return 0


def _launch(args: argparse.Namespace) -> int:
    from common.config import load_config
    from rollout_server.launch import LaunchConfig, launch

    return launch(load_config(LaunchConfig, args.config, args.overrides))


def _bench(args: argparse.Namespace) -> int:
    from rollout_server.bench_rollout import BenchSpec, run_bench

    check_positive(args, "num_groups", "num_samples", "max_new_tokens", "prompt_len", "groups_in_flight", "repeats")
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
    print_result(result, args.json)
    return 0
