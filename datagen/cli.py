"""`longtrace data validate|stats|build|synth` (registered by deploy/cli.py). Imports stay inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common.cli import QUIET, SubParsers, add_config, command
from common.config import ConfigError


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add this package's subcommands and benchmarks. Keep imports inside the handlers."""
    data = commands.add_parser("data", help="LongTraceRL datasets: validate, stats, build, fit, synth")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = command(
        sub, "validate", _validate, logs=QUIET, help="check a LongTraceRL JSONL dataset; errors name file and line"
    )
    p.add_argument("file", help="dataset JSONL (or .jsonl.gz)")
    p.add_argument("--max-errors", type=int, default=20, help="errors to print (all are counted)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(sub, "stats", _stats, help="rows, context tokens, rubric counts of a dataset")
    p.add_argument("file", help="dataset JSONL (or .jsonl.gz)")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer directory (default: whitespace words)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        sub, "build", _build, help="tiered-distractor contexts from search-agent trajectories (datagen/builder.py)"
    )
    p.add_argument("--questions", required=True, help="questions JSONL")
    p.add_argument("--trajectories", required=True, help="trajectories JSONL")
    p.add_argument("--docs", required=True, help="document store JSONL")
    p.add_argument("--out", required=True, help="output dataset JSONL (or .jsonl.gz)")
    add_config(p, "TOML file of a BuildConfig (datagen/config.py); the flags below override its keys")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer directory (default: whitespace words)")
    p.add_argument("--context-tokens", type=int, help="token budget of the user message (default 131072)")
    p.add_argument("--seed", type=int, help="shuffle seed (default 0)")
    p.add_argument("--instruction", help="first line of the user message")
    p.add_argument("--tier1-ratio", type=float, help="share of Tier-1 among distractors (default: Tier-1 first)")
    p.add_argument("--random-fill", action="store_true", default=None, help="fill the rest with random documents")
    p.add_argument("--dataset-name", help="dataset_name of questions that name none (default longtracerl)")
    p.add_argument("--docs-index", help="keep the document index here and reuse it (default: a temporary file)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")

    p = command(sub, "fit", _fit, help="trim built rows to a smaller token budget, dropping whole documents")
    p.add_argument("src", help="dataset JSONL built by `longtrace data build` (or .jsonl.gz)")
    p.add_argument("dst", help="output dataset JSONL (or .jsonl.gz)")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, required=True,
                   help="token budget of the user message (count as in `data build`: no chat template)")  # fmt: skip
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer directory (default: whitespace words)")
    p.add_argument("--doc-separator", dest="doc_separator", default="\n", help="text between documents (build's)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    p = command(
        sub, "synth", _synth, help="a synthetic world, agent trajectories and the built dataset (datagen/synth/)"
    )
    p.add_argument("--out", required=True, help="output directory")
    add_config(p, "TOML file of a SynthConfig (datagen/config.py); the flags below override its keys")
    p.add_argument("--style", choices=["full", "tiny"], help="full (default) or tiny (the demo's word-level world)")
    for flag, typ, text in (
        ("--num-questions", int, "rows to produce (default 100)"),
        ("--hops", int, "chain edges incl. the final attribute (default 3; tiny 2)"),
        ("--context-tokens", int, "token budget of the user message (default 1024; tiny 60)"),
        ("--tier1-ratio", float, "share of Tier-1 among distractors (default: Tier-1 first)"),
        ("--confusability", float, "full style: chance a name reuses a word of another (default 0.3)"),
        ("--seed", int, "seed of everything (default 0)"),
        ("--num-entities", int, "entities per world (default 300; tiny 64)"),
        ("--num-cities", int, "tiny style: cities (default 32)"),
        ("--questions-per-world", int, "questions before a fresh world (default: one world; tiny 4)"),
        ("--trajectories-per-question", int, "agent trajectories per question (default 5)"),
        ("--top-k", int, "search results per query (default 8)"),
        ("--wrong-open-prob", float, "chance the agent opens a wrong result at a hop (default 0.5)"),
        ("--agent-error-prob", float, "chance a trajectory answers wrongly (default 0.15)"),
    ):
        p.add_argument(flag, type=typ, help=text)
    p.add_argument("--random-fill", action="store_true", default=None, help="fill the rest with random documents")
    p.add_argument("--instruction", help="full style: first line of the user message")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer directory (default: whitespace words)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _config(cls: Any, args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    """Build a pydantic config from `--config FILE` and the flags that were given (a flag wins over the file's
    key); errors name the flag, or the file's key."""
    import tomllib
    from pathlib import Path

    from pydantic import ValidationError

    from common.config import load_config

    values: dict[str, Any] = {}
    if args.config is not None:
        load_config(cls, args.config)  # a missing file, bad TOML, an unknown or bad key: named
        values = tomllib.loads(Path(args.config).read_text())
    values |= {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"--{str(err['loc'][0]).replace('_', '-') if err['loc'] else '?'}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise ConfigError(problems) from None


def _fail(command: str, err: Exception) -> int:
    print(f"longtrace data {command}: error: {err}", file=sys.stderr)
    return 1


def _validate(args: argparse.Namespace) -> int:
    from datagen.dataset import DatasetError, validate_file

    try:
        report = validate_file(args.file, max_errors=args.max_errors)
    except DatasetError as e:  # the file itself is missing or unreadable
        return _fail("validate", e)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for problem in report.errors:
            print(problem, file=sys.stderr)
        more = report.num_errors - len(report.errors)
        if more > 0:
            print(f"... and {more} more errors", file=sys.stderr)
        status = "OK" if report.ok else "INVALID"
        print(f"{status}: {report.num_rows} valid rows, {report.num_errors} invalid lines in {args.file}")
    return 0 if report.ok else 1


def _stats(args: argparse.Namespace) -> int:
    from datagen.dataset import DatasetError
    from datagen.stats import dataset_stats, format_stats
    from datagen.tokens import load_counter

    counter = load_counter(args.tokenizer)
    try:
        stats = dataset_stats(args.file, counter)
    except DatasetError as e:
        return _fail("stats", e)
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0


def _build(args: argparse.Namespace) -> int:
    from datagen.builder import build_files
    from datagen.config import BuildConfig
    from datagen.dataset import DatasetError
    from datagen.tokens import load_counter

    names = ("context_tokens", "seed", "instruction", "tier1_ratio", "random_fill", "dataset_name")
    config = _config(BuildConfig, args, names)
    counter = load_counter(args.tokenizer)
    try:
        stats = build_files(
            args.questions, args.trajectories, args.docs, args.out, counter, config, args.quiet, args.docs_index
        )
    except DatasetError as e:
        return _fail("build", e)
    out = stats.to_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wrote {out['num_rows']} rows of {out['num_questions']} questions to {args.out}")
        print(f"  skipped {out['skipped']}  trajectories {out['trajectories']}")
        print(f"  context docs {out['context_docs']}  tokens {out['context_tokens']}")
        print(f"  distractors with a rubric entity {out['distractors_with_rubric_entity']}")
    return 0 if out["num_rows"] else _fail("build", ValueError(f"no rows built: {out['skipped']}"))


def _fit(args: argparse.Namespace) -> int:
    from datagen.dataset import DatasetError
    from datagen.fit import fit_file
    from datagen.tokens import load_counter

    if args.max_tokens < 1:
        return _fail("fit", ValueError(f"--max_tokens {args.max_tokens}: must be at least 1"))
    counter = load_counter(args.tokenizer)
    try:
        summary = fit_file(args.src, args.dst, args.max_tokens, counter, args.doc_separator)
    except DatasetError as e:
        return _fail("fit", e)
    out = summary.to_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wrote {out['rows_out']} of {out['rows_in']} rows to {args.dst} ({out['rows_trimmed']} trimmed)")
        print(f"  documents dropped {out['docs_dropped']}")
        for miss in out["cannot_fit"]:
            print(f"  cannot fit: line {miss['line']} question {miss['question_id']!r}: {miss['kept_tokens']} "
                  f"tokens with its gold and rubric documents only")  # fmt: skip
    return 0 if out["rows_out"] else _fail("fit", ValueError(f"no row fits --max_tokens {args.max_tokens}"))


def _synth(args: argparse.Namespace) -> int:
    from datagen.config import SynthConfig
    from datagen.synth.pipeline import synthesize, write_synth
    from datagen.tokens import load_counter

    names = (
        "style",
        "num_questions",
        "hops",
        "context_tokens",
        "tier1_ratio",
        "confusability",
        "seed",
        "num_entities",
        "num_cities",
        "questions_per_world",
        "trajectories_per_question",
        "top_k",
        "wrong_open_prob",
        "agent_error_prob",
        "random_fill",
        "instruction",
    )
    config = _config(SynthConfig, args, names)
    if config.style == "tiny" and args.tokenizer:
        raise ConfigError("--tokenizer: the tiny world counts words (its tokenizer is word-level)")
    result = synthesize(config, counter=load_counter(args.tokenizer), quiet=args.quiet)
    paths = write_synth(result, args.out)
    summary = result.summary() | {"paths": paths}
    if args.json:
        print(json.dumps(summary))
    else:
        build = summary["build"]
        print(f"wrote {build['num_rows']} rows from {summary['num_worlds']} world(s) to {paths['dataset']}")
        print(f"  context tokens {build['context_tokens']}")
        print(f"  context docs {build['context_docs']}")
        print(f"  distractors with a rubric entity {build['distractors_with_rubric_entity']}")
    return 0 if result.rows else _fail("synth", ValueError(f"no rows: {dict(result.stats.skipped)}"))
