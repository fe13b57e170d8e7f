"""`longtrace eval` subcommands (register them with `register(commands, benches)`).

    longtrace eval --config configs/eval.toml [--model DIR] [--json] [--key value ...]
    longtrace eval compare RUN_A RUN_B [--json] [--max-flips N]

`python -m eval.cli ARGS` is `longtrace eval ARGS`. The `eval` parser hands every argument to this module
unparsed: its overrides (`--k 8`) would otherwise be read as the `compare` positional by argparse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.cli import Logs, SubParsers, add_config, command, parse, run_command, standalone, user_errors
from common.config import ConfigError

_RUN_EPILOG = (
    "Every EvalConfig key is an override: --k 8 --temperature 0 --max_questions 100 --engine_urls "
    "'[\"http://host:30000\"]' --reward_url http://host:7248 --local.num_threads 4 ... "
    "Compare two runs: longtrace eval compare RUN_A RUN_B."
)


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add `eval` (and `eval compare`). Imports nothing heavy."""
    parser = command(
        commands,
        "eval",
        _eval,
        logs=Logs(prefix="eval "),
        help="avg@k / pass@k evaluation of a JSONL through engines and the reward API; `eval compare A B`",
        description="longtrace eval --config FILE [--model DIR] [--key value ...] | longtrace eval compare A B "
        "(run `longtrace eval --help` for the options)",
        prefix_chars="+",  # nothing is parsed here: _eval parses its arguments itself
        add_help=False,
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="arguments of `eval` or `eval compare`")


def _run_parser() -> argparse.ArgumentParser:
    parser = standalone(
        "longtrace eval",
        _run,
        overrides=True,
        description="Generate k samples per question of an eval JSONL through the engines (a URL, or a router), "
        "score them with the reward API at η = 0, write OUT_DIR/samples.jsonl and summary.json, print a table. "
        "With --model DIR and no engine / reward URL, a local built-in engine and reward API are started.",
        epilog=_RUN_EPILOG,
    )
    add_config(parser, "TOML file of an EvalConfig (e.g. configs/eval.toml)")
    parser.add_argument("--model", default=None, help="model directory (EvalConfig.model_path)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return parser


def _compare_parser() -> argparse.ArgumentParser:
    parser = standalone(
        "longtrace eval compare",
        _compare,
        description="Two eval runs side by side: metrics with deltas (B - A), the settings that differ, and the "
        "questions right in one run and wrong in the other (right: at least half of its samples correct).",
    )
    parser.add_argument("run_a", help="out_dir of run A (or its summary.json)")
    parser.add_argument("run_b", help="out_dir of run B (or its summary.json)")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.add_argument("--max-flips", type=int, default=20, help="flipped questions listed per direction")
    return parser


def _eval(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    sub = parse(_compare_parser(), argv[1:]) if argv[:1] == ["compare"] else parse(_run_parser(), argv)
    code: int = sub.func(sub)
    return code


def _run(ns: argparse.Namespace) -> int:
    from common.config import load_config
    from common.supervisor import ChildFailed
    from eval.config import EvalConfig
    from eval.local import services
    from eval.outputs import SAMPLES_FILE, SampleWriter, build_summary, write_summary
    from eval.run import EvalError, prepare, run_eval
    from eval.table import format_summary

    t0 = time.monotonic()
    overrides = list(ns.overrides)
    if ns.model is not None:
        overrides += ["--model_path", json.dumps(ns.model)]
    cfg = load_config(EvalConfig, ns.config, overrides)
    out_dir = Path(cfg.out_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = str(out_dir)
    writer = SampleWriter(out_dir)
    try:
        with services(cfg, out_dir / "logs") as svc:
            inputs = prepare(cfg)  # while local services start
            svc.wait_ready()
            try:
                run = run_eval(cfg, svc.engine_urls, svc.reward_url, inputs, writer.write, keep_responses=False)
            except EvalError:
                if svc.supervisor is not None:
                    svc.supervisor.check()  # a local service that died explains the failure best (its log tail)
                raise
    except (EvalError, ChildFailed) as e:
        writer.close()
        print(f"longtrace eval: error: {e}\n(samples so far: {writer.partial})", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad file named by a flag (dataset, reward config)
        writer.close()
        raise ConfigError(str(e)) from e
    writer.finish()
    summary = build_summary(cfg, run, local=svc.local, wall_s=time.monotonic() - t0)
    summary_path = write_summary(out_dir, summary)
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(f"\nsamples: {out_dir / SAMPLES_FILE}\nsummary: {summary_path}")
    return 0


def _compare(ns: argparse.Namespace) -> int:
    from eval.compare import compare, load
    from eval.table import format_compare

    with user_errors():
        a, b = load(ns.run_a), load(ns.run_b)
    result = compare(a, b)
    print(json.dumps(result, indent=2) if ns.json else format_compare(result, ns.max_flips))
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m eval.cli ARGS`: the same as `longtrace eval ARGS`."""
    run_command(register, ["eval"], argv)


if __name__ == "__main__":
    main()
