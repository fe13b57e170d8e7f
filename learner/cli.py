"""`longtrace` subcommands of learner (registered by deploy/cli.py): `export-hf`, `bench learner` and
`bench learner-memory`."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import SubParsers, add_config, bench, check_positive, command, print_result, user_errors
from common.config import ConfigError
from learner.train_cli import register_train


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add this package's subcommands and benchmarks. Keep imports inside the handlers."""
    register_train(commands, benches)
    export = command(
        commands,
        "export-hf",
        _export_hf,
        overrides=True,
        help="export a checkpoint through the megatron model to a loadable Hugging Face directory",
        description=(
            "Load CKPT into the megatron model (sharded as --model.tp_size/--model.pp_size say) and write OUT as a "
            "Hugging Face directory (safetensors + index, config, tokenizer). CKPT is a Hugging Face directory for "
            "now (the round trip); megatron training checkpoints come with the training loop. Run under torchrun "
            "for TP/PP > 1: torchrun --nproc_per_node 2 -m deploy.cli export-hf CKPT OUT --model.tp_size 2"
        ),
    )
    export.add_argument("ckpt", metavar="CKPT", help="source checkpoint: a Hugging Face model directory")
    export.add_argument("out", metavar="OUT", help="output directory (created)")
    add_config(export, "learner TOML config; --model.KEY VALUE flags override it")
    export.add_argument("--max-shard-mb", type=int, default=2048, help="size of each written safetensors file")

    b = bench(
        benches,
        "learner",
        _bench_learner,
        help="train tokens/s: megatron-core (DDP + Adam) vs transformers + torch AdamW on the same batch",
    )
    b.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    b.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    b.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side, interleaved (median)")
    b.add_argument("--threads", type=int, default=1, help="torch threads of both sides")

    m = bench(
        benches,
        "learner-memory",
        _bench_learner_memory,
        overrides=True,
        help="peak RSS of one learner rank for one train step vs sequence length: baseline vs new path (CPU)",
        description=(
            "Each (path, seq_len) runs one Learner.train_step in a fresh process on CPU (Qwen3 vocabulary, small "
            "hidden size) and reports the step's peak RSS; the paths are TrainConfig overrides (learner/"
            "bench_memory.py PATHS). Flags: BenchMemoryConfig fields, e.g. --seq_lens 1024,2048,4096 --skip_cp."
        ),
        epilog="Overrides: --seq_lens 1024,2048 --cp_seq_len 4096 --max_rss_mb 16000 --hidden_size 256 --num_layers 2 "
        "--timeout_s 900 --skip_cp --vocab_size 4096 --path_overrides.new.batch.logprob_chunk_mb 128",
    )
    add_config(m, "BenchMemoryConfig TOML (optional); --key value flags override it")


def _export_hf(args: argparse.Namespace) -> int:
    from common.config import load_config
    from learner.config import LearnerConfig

    cfg = load_config(LearnerConfig, args.config, args.overrides)
    src = Path(args.ckpt)
    if not (src / "config.json").is_file():
        raise ConfigError(f"CKPT {str(src)!r} is not a Hugging Face model directory (no config.json)")
    check_positive(args, "max_shard_mb")
    cfg.model.hf_path = str(src)

    from learner.model.build import build_model
    from learner.model.export import export_hf
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import destroy_parallel, init_parallel

    try:
        with user_errors():  # unsupported architecture, bad parallel layout: a user error, not a crash
            arch = load_hf_arch(src)
            init_parallel(cfg.model)
            model = build_model(arch, cfg.model)
            load_hf_weights(model, src, arch)
            export_hf(model, args.out, src, max_shard_mb=args.max_shard_mb)
    finally:
        destroy_parallel()
    return 0


def _bench_learner(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from learner.bench import run_learner_bench

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with user_errors():
        result = run_learner_bench(args.batch_size, args.seq_len, args.steps, args.threads)
    print_result(result, args.json)
    return 0


def _bench_learner_memory(args: argparse.Namespace) -> int:
    import sys

    from common.config import load_config
    from learner.bench_memory import BenchMemoryConfig, format_table, run_memory_bench

    cfg = load_config(BenchMemoryConfig, args.config, args.overrides)
    result = run_memory_bench(cfg, progress=sys.stderr)
    print_result(result, args.json, text=format_table)
    return 0
