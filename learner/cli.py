"""`longtrace` subcommands of learner (registered by deploy/cli.py): `learner`, `export-hf`, `checkpoints list`,
`bench learner` and `bench learner-memory`."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import QUIET, SubParsers, add_config, bench, check_positive, command, print_result, user_errors
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
        help="export a training checkpoint (or an HF directory, the round trip) to a loadable Hugging Face directory",
        description=(
            "Load a checkpoint into the megatron model (sharded as --model.tp_size/--model.pp_size say, default one "
            "process) and write OUT as a Hugging Face directory (safetensors + index, config, tokenizer). "
            "--checkpoint is a training checkpoint (RUN_DIR/checkpoints/step_N, or a checkpoints or run directory: "
            "its latest) saved under any TP/PP layout: its weights are resharded on load (the optimizer state is "
            "not read) and written in the dtype the run trained in (--model.dtype overrides); config and tokenizer "
            "come from the copy saved with the checkpoint, else the run's base model (--hf_config overrides). A "
            "positional CKPT may also be a Hugging Face directory. TP/PP > 1 under torchrun: torchrun "
            "--nproc_per_node 2 -m deploy.cli export-hf --checkpoint CKPT --out OUT --model.tp_size 2"
        ),
    )
    export.add_argument(
        "ckpt", metavar="CKPT", nargs="?", help="source: a Hugging Face model directory, or a training checkpoint"
    )
    export.add_argument("out", metavar="OUT", nargs="?", help="output directory (created)")
    export.add_argument("--checkpoint", metavar="DIR", help="source training checkpoint (instead of CKPT)")
    export.add_argument("--out", dest="out_dir", metavar="DIR", help="output directory (instead of OUT)")
    export.add_argument(
        "--hf_config",
        "--hf-config",
        dest="hf_config",
        metavar="DIR",
        help="HF directory whose config and tokenizer go with a training checkpoint (its weights are not read)",
    )
    add_config(export, "learner TOML config; --model.KEY VALUE flags override it")
    export.add_argument("--max-shard-mb", type=int, default=2048, help="size of each written safetensors file")

    ckpts = commands.add_parser("checkpoints", help="training checkpoints of a run")
    ckpt_cmds = ckpts.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)
    listing = command(
        ckpt_cmds,
        "list",
        _list_checkpoints,
        logs=QUIET,
        help="saved steps with their policy version, save time and size",
        description=(
            "RUN_DIR is a learner run directory, a `longtrace up` run directory (every phase) or a checkpoints "
            "directory. `latest` marks what a resume loads; `kept`, a version --checkpoint.keep_every_steps keeps "
            "for good; `incomplete`, a save that did not finish."
        ),
    )
    listing.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoints directory")
    listing.add_argument("--json", action="store_true", help="print one JSON object")

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
    from learner.checkpoint_catalog import find_hf_config, model_section, resolve_checkpoint
    from learner.config import LearnerConfig

    cfg = load_config(LearnerConfig, args.config, args.overrides)
    if (args.ckpt is None) == (args.checkpoint is None):
        raise ConfigError("name the source once: CKPT (positional) or --checkpoint DIR")
    if args.out is not None and args.out_dir is not None:
        raise ConfigError("name the output once: OUT (positional) or --out DIR")
    out = args.out if args.out is not None else args.out_dir
    if out is None:
        raise ConfigError("the output directory is required: OUT (positional) or --out DIR")
    check_positive(args, "max_shard_mb")
    flag = "CKPT" if args.ckpt is not None else "--checkpoint"
    src = Path(args.ckpt if args.ckpt is not None else args.checkpoint)
    checkpoint: Path | None = None
    try:
        checkpoint = resolve_checkpoint(src, flag)
    except ValueError as e:
        if not _is_hf_dir(src):
            raise ConfigError(
                f"{e}; nor is it a Hugging Face model directory (no config.json with a model_type)"
            ) from e
    if checkpoint is None:
        if args.hf_config:
            raise ConfigError(f"--hf_config goes with a training checkpoint; {flag} {src} is a Hugging Face directory")
        hf_dir = src
    else:
        with user_errors():
            hf_dir = Path(args.hf_config) if args.hf_config else find_hf_config(checkpoint)
        if not (hf_dir / "config.json").is_file():
            raise ConfigError(f"--hf_config {hf_dir}: no config.json (the base model's HF directory)")
        # The run's dtype (the weights as trained) and vocabulary padding unless given here; the layout is this
        # command's own (the checkpoint reshards to it).
        run, given = model_section(checkpoint), cfg.model.model_fields_set
        kept = {k: run[k] for k in ("dtype", "make_vocab_size_divisible_by") if k in run and k not in given}
        cfg.model = type(cfg.model).model_validate(cfg.model.model_dump() | kept)
    cfg.model.hf_path = str(hf_dir)

    from learner.model.build import build_model
    from learner.model.export import export_hf
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import destroy_parallel, init_parallel

    try:
        with user_errors():  # unsupported architecture, bad parallel layout: a user error, not a crash
            arch = load_hf_arch(hf_dir)
            _init_single_process(cfg.model.dist_timeout_s)
            init_parallel(cfg.model)
            model = build_model(arch, cfg.model)
            if checkpoint is not None:
                from learner.checkpoint import load_model_weights

                load_model_weights(checkpoint, model)
            else:
                load_hf_weights(model, hf_dir, arch)
            export_hf(model, out, hf_dir, max_shard_mb=args.max_shard_mb, progress=True)
    finally:
        destroy_parallel()
    return 0


def _is_hf_dir(path: Path) -> bool:
    import json

    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _init_single_process(timeout_s: float) -> None:
    """Outside torchrun, a world of one over an in-process store: no TCP port to collide with another job's."""
    import datetime
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed import HashStore  # type: ignore[attr-defined]

    if "WORLD_SIZE" in os.environ or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=HashStore(), rank=0, world_size=1, timeout=timeout)


def _list_checkpoints(args: argparse.Namespace) -> int:
    import json

    from learner.checkpoint_catalog import checkpoint_roots, format_table, list_checkpoints

    with user_errors():
        roots = {str(root): list_checkpoints(root) for root in checkpoint_roots(args.run_dir)}
    if args.json:
        listed = [c.to_json() | {"dir": root} for root, infos in roots.items() for c in infos]
        print(json.dumps({"checkpoints": listed}), flush=True)
    else:
        print(format_table(roots), flush=True)
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
