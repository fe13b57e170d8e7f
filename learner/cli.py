"""`longtrace` subcommands of learner (registered by deploy/cli.py): `export-hf` and `bench learner`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.config import ConfigError
from learner.train_cli import register_train


def register(commands: argparse._SubParsersAction[Any], benches: argparse._SubParsersAction[Any]) -> None:
    """Add this package's subcommands and benchmarks. Keep imports inside the handlers."""
    register_train(commands, benches)
    export = commands.add_parser(
        "export-hf",
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
    export.add_argument("--config", default=None, help="learner TOML config; --model.KEY VALUE flags override it")
    export.add_argument("--max-shard-mb", type=int, default=2048, help="size of each written safetensors file")
    export.set_defaults(func=_export_hf, overrides=True)

    bench = benches.add_parser(
        "learner",
        help="train tokens/s: megatron-core (DDP + Adam) vs transformers + torch AdamW on the same batch",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    bench.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    bench.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side, interleaved (median)")
    bench.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    bench.set_defaults(func=_bench_learner)


def _export_hf(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.logs import setup_logging
    from learner.config import LearnerConfig

    setup_logging()
    cfg = load_config(LearnerConfig, args.config, args.overrides)
    src = Path(args.ckpt)
    if not (src / "config.json").is_file():
        raise ConfigError(f"CKPT {str(src)!r} is not a Hugging Face model directory (no config.json)")
    if args.max_shard_mb < 1:
        raise ConfigError("--max-shard-mb must be >= 1")
    cfg.model.hf_path = str(src)

    from learner.model.build import build_model
    from learner.model.export import export_hf
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import destroy_parallel, init_parallel

    try:
        arch = load_hf_arch(src)
        init_parallel(cfg.model)
        model = build_model(arch, cfg.model)
        load_hf_weights(model, src, arch)
        export_hf(model, args.out, src, max_shard_mb=args.max_shard_mb)
    except ValueError as e:  # unsupported architecture, bad parallel layout: a user error, not a crash
        raise ConfigError(str(e)) from e
    finally:
        destroy_parallel()
    return 0


def _bench_learner(args: argparse.Namespace) -> int:
    import logging

    from transformers.utils import logging as hf_logging

    from learner.bench import run_learner_bench

    logging.getLogger().setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        result = run_learner_bench(args.batch_size, args.seq_len, args.steps, args.threads)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
