"""`longtrace` subcommands of reward_service (registered by deploy/cli.py).

longtrace reward serve  [--config F] [--host H] [--port P] [--allow_unauthenticated] [--section.key value ...]
longtrace reward worker [--config F] [--section.key value ...]
longtrace bench reward  [--json] [--upstream PATH] [--requests N] [--concurrency C] [--judge_delay_s S] ...
"""

from __future__ import annotations

import argparse
from typing import Any

from common.cli import Logs, SubParsers, add_config, bench, check_positive, command
from common.config import ConfigError


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add this package's subcommands and benchmarks. Keep imports inside the handlers."""
    reward = commands.add_parser("reward", help="the rubric-reward service (HTTP API and stream worker)")
    sub = reward.add_subparsers(dest="reward_command", metavar="SUBCOMMAND", required=True)

    serve = command(
        sub,
        "serve",
        _serve,
        overrides=True,
        logs=Logs(prefix="reward "),
        help="run the HTTP API (POST /evaluate, /v1/score, /v1/score_group; GET /health, /metrics)",
        epilog="Any config key can be overridden: --judge.kind llm --judge.base_url URL --eta 0.3 ...",
    )
    add_config(serve, "TOML file with a RewardConfig")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 7248)")

    worker = command(
        sub,
        "worker",
        _worker,
        overrides=True,
        logs=Logs(prefix="reward-worker "),
        help="consume `rollouts`, score groups, publish to `scored`",
        epilog="Any config key can be overridden: --broker.redis_url URL --worker.consumer NAME ...",
    )
    add_config(worker, "TOML file with a RewardConfig")

    b = bench(
        benches,
        "reward",
        _bench,
        help="/evaluate throughput vs the upstream LongTraceRL reward server (--upstream PATH), stub LLM judge",
    )
    b.add_argument(
        "--upstream",
        default=None,
        help="path of LongTraceRL's launch_server.py (not in this repo; needs `pip install openai`)",
    )
    b.add_argument("--requests", type=int, default=1536, help="timed requests per server")
    b.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    b.add_argument("--clients", type=int, default=1, help="load-generator processes sharing the concurrency")
    b.add_argument("--num_processes", type=int, default=1, help="the service's worker processes")
    b.add_argument("--judge_delay_s", type=float, default=None, help="also measure against a judge this slow")
    b.add_argument("--judge_concurrency", type=int, default=32, help="calls the slow judge serves at once")
    b.add_argument("--slow_requests", type=int, default=1024, help="timed requests against the slow judge")


def _config(args: argparse.Namespace, extra: list[str]) -> Any:
    from common.config import load_config
    from reward_service.config import RewardConfig

    return load_config(RewardConfig, args.config, list(args.overrides) + extra)


def _serve(args: argparse.Namespace) -> int:
    extra = (["--host", args.host] if args.host else []) + (["--port", str(args.port)] if args.port is not None else [])
    config = _config(args, extra)

    import os
    import signal

    import uvicorn

    from common.exposure import check_exposure
    from reward_service.app import CONFIG_ENV, create_app

    check_exposure(
        config.host,
        config.auth_token() is not None,  # a bad --auth_token_file fails here, before binding
        config.allow_unauthenticated,
        "the reward service",
        "in an env var named by --auth_token_env, or a file named by --auth_token_file",
        risk="have requests scored at the expense of this CPU and the judge",
    )

    # uvicorn logs accesses at INFO: at "warning" the access log would be on and print nothing
    log_level = "info" if config.access_log else "warning"
    # uvicorn re-raises the signal it shut down on; with a handler SIGTERM is a clean exit 0 (as the engine's).
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    common = {"host": config.host, "port": config.port, "log_level": log_level, "access_log": config.access_log}
    if config.num_processes == 1:
        uvicorn.run(create_app(config), **common)
        return 0
    # worker processes are spawned: each builds its app from the config passed in the environment
    os.environ[CONFIG_ENV] = config.model_dump_json()
    uvicorn.run("reward_service.app:app_from_env", factory=True, workers=config.num_processes, **common)
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    config = _config(args, [])

    import logging

    from broker.factory import connect
    from common.metrics_http import MetricsHTTP
    from reward_service.judges import build_judge
    from reward_service.metrics import REGISTRY
    from reward_service.worker import RewardWorker

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        judge = build_judge(config.judge)
        broker = connect(config.broker)
        broker.attach_run("reward worker")
        metrics = MetricsHTTP(REGISTRY)
        w = config.worker
        if w.metrics:
            port = metrics.start(w.metrics_host, w.metrics_port, w.metrics_port_span)
            logging.getLogger(__name__).info("reward worker /metrics on %s:%d", w.metrics_host, port)
        try:
            await RewardWorker(config, broker, judge).run(stop)
        finally:
            metrics.close()
            await judge.aclose()
            broker.close()

    asyncio.run(main())
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os
    import shlex
    import sys

    from reward_service.bench import run_bench

    check_positive(args, "requests", "concurrency", "clients", "num_processes", "judge_concurrency", "slow_requests")
    if args.clients > args.concurrency:
        raise ConfigError(f"--clients {args.clients} must be <= --concurrency {args.concurrency}")
    if args.judge_delay_s is not None and args.judge_delay_s <= 0:
        raise ConfigError(f"--judge_delay_s {args.judge_delay_s} must be > 0")
    if args.upstream is not None and not os.path.isfile(args.upstream):
        raise ConfigError(f"--upstream {args.upstream!r}: no such file (LongTraceRL's launch_server.py)")
    run_bench(
        num_requests=args.requests,
        concurrency=args.concurrency,
        clients=args.clients,
        as_json=args.json,
        upstream=args.upstream,
        processes=args.num_processes,
        judge_delay_s=args.judge_delay_s,
        judge_concurrency=args.judge_concurrency,
        slow_requests=args.slow_requests,
        command=shlex.join(["longtrace", *sys.argv[1:]]),
    )
    return 0
