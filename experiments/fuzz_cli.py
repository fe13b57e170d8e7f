"""`longtrace bench fuzz`: schemathesis against the reward service and the built-in engine (registered by deploy/cli.py).

longtrace bench fuzz [--json] [--max-examples N] [--services reward,engine] [--seed S] [--no-http]

Prints one JSON object: {requests, status_5xx, status_4xx_without_reason, transport_errors, endpoints, seconds,
per_service: {...}}. Each service is fuzzed in-process (ASGI) and once over real HTTP with bearer auth on, so
the control endpoints are reached authenticated. Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from common.cli import Logs, SubParsers, bench, check_positive, print_result, run_command


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add `bench fuzz`. Keep imports inside the handler."""
    b = bench(
        benches,
        "fuzz",
        _bench,
        json_help="print only the JSON result",
        logs=Logs(level="WARNING", json_level="ERROR"),
        help="schemathesis (property-based) fuzzing of the reward and engine HTTP APIs: 5xx and unexplained 4xx",
    )
    b.add_argument("--max-examples", type=int, default=100, help="generated requests per operation and mode")
    b.add_argument("--services", default="reward,engine", help="comma-separated: reward, engine")
    b.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same requests)")
    b.add_argument("--no-http", action="store_true", help="skip the runs over real HTTP")


def _bench(args: argparse.Namespace) -> int:
    import json
    import logging
    import tempfile

    from common.config import ConfigError

    services = [s.strip() for s in args.services.split(",") if s.strip()]
    unknown = sorted(set(services) - {"reward", "engine"})
    if unknown or not services:
        raise ConfigError(f"--services: unknown {unknown or 'empty list'}; choose from reward, engine")
    check_positive(args, "max_examples")
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # fuzzed rendezvous failures
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from experiments.fuzz import FuzzReport

    per: dict[str, FuzzReport] = {}
    kw = {"max_examples": args.max_examples, "seed": args.seed}
    if "reward" in services:
        per["reward"] = _reward(kw, http=not args.no_http)
    if "engine" in services:
        with tempfile.TemporaryDirectory(prefix="fuzz-engine-") as tmp:
            per["engine"] = _engine(tmp, kw, http=not args.no_http)
    total = FuzzReport()
    for report in per.values():
        total = total.merge(report)
    out = total.as_dict()
    out["failures"] = out["failures"][:10]
    out["per_service"] = {name: r.as_dict() for name, r in per.items()}
    out["max_examples"] = args.max_examples
    out["ratio"] = None  # a correctness bench: what it counts are failures (5xx, 4xx without a reason), not speed
    out["no_ratio"] = "a correctness bench: pass means zero status_5xx, status_4xx_without_reason, transport_errors"
    print_result(out, args.json, text=lambda r: json.dumps(r, indent=2))
    return 0 if total.ok else 1


def _reward(kw: dict[str, Any], http: bool) -> Any:
    from experiments.fuzz import fuzz_app, fuzz_url, reward_app
    from rollout_server.engine.server import BackgroundServer

    report = fuzz_app(reward_app(), **kw)
    if http:
        token = os.urandom(16).hex()
        with BackgroundServer(reward_app(token=token)) as server:
            report = report.merge(fuzz_url(server.url, headers={"Authorization": f"Bearer {token}"}, **kw))
    return report


def _engine(tmp: str, kw: dict[str, Any], http: bool) -> Any:
    from experiments.fuzz import ENGINE_FOLLOW_UPS, engine_config, fuzz_app, fuzz_url
    from rollout_server.engine.api import build_app
    from rollout_server.engine.engine import Engine
    from rollout_server.engine.server import BackgroundServer
    from rollout_server.models import init_tiny_model

    model = init_tiny_model(os.path.join(tmp, "model"))
    token = os.urandom(16).hex()
    token_file = os.path.join(tmp, "token")
    with open(token_file, "w") as f:
        f.write(token)
    auth = {"Authorization": f"Bearer {token}"}  # so the control endpoints are fuzzed past the guard
    engine = Engine(engine_config(model, api_key_file=token_file))
    engine.start()
    try:
        report = fuzz_app(build_app(engine), headers=auth, follow_ups=ENGINE_FOLLOW_UPS, **kw)
        if http:
            with BackgroundServer(build_app(engine)) as server:
                report = report.merge(fuzz_url(server.url, headers=auth, follow_ups=ENGINE_FOLLOW_UPS, **kw))
    finally:
        engine.shutdown()
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the bench alone (`python -m experiments.fuzz_cli ARGS`): the same as `longtrace bench fuzz ARGS`."""
    run_command(register, ["bench", "fuzz"], argv)


if __name__ == "__main__":
    main()
