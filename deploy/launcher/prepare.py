"""Set-up of `longtrace up` before any service starts: the tiny demo world and a tiny model built for it.

Writes DATA_DIR/{train,validation,heldout}.jsonl (LongTraceRL rows; validation and held-out questions come from
worlds never seen in training, and from different ones), DATA_DIR/sft.jsonl (one demonstration per training
question, plus `num_sft_last_hop` one-hop ones), DATA_DIR/vocab.txt, and a seeded tiny model with a word-level
tokenizer over that vocabulary in MODEL_DIR. Runs as a child job of the launcher (it
imports torch and transformers); skipped when a previous run left a complete result (DATA_DIR/prepared.json
with the same settings, and MODEL_DIR/config.json).

    python -m deploy.launcher.prepare --config PREPARE.toml --data-dir D --model-dir M
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common.config import load_config
from deploy.launcher.sections import PrepareSection

log = logging.getLogger(__name__)

DONE_FILE = "prepared.json"


def is_prepared(cfg: PrepareSection, data_dir: Path, model_dir: Path) -> bool:
    done = data_dir / DONE_FILE
    return (
        done.is_file()
        and json.loads(done.read_text()) == cfg.model_dump(mode="json")
        and (model_dir / "config.json").is_file()
    )


def prepare_tiny_demo(cfg: PrepareSection, data_dir: Path, model_dir: Path) -> None:
    from datagen.dataset import write_jsonl, write_rows
    from datagen.synth.demo import demo_splits
    from rollout_server.models import init_tiny_model

    if is_prepared(cfg, data_dir, model_dir):
        log.info("data and model already prepared in %s and %s", data_dir, model_dir)
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = demo_splits(
        seed=cfg.seed,
        num_train=cfg.num_train,
        num_heldout=cfg.num_heldout,
        num_validation=cfg.num_validation,
        num_sft_last_hop=cfg.num_sft_last_hop,
        **cfg.synth,
    )
    write_rows(data_dir / "train.jsonl", splits.train)
    write_rows(data_dir / "validation.jsonl", splits.validation)
    write_rows(data_dir / "heldout.jsonl", splits.heldout)
    write_jsonl(data_dir / "sft.jsonl", splits.sft)
    (data_dir / "vocab.txt").write_text("\n".join(splits.vocabulary) + "\n")
    log.info("wrote %d train, %d held-out rows to %s", len(splits.train), len(splits.heldout), data_dir)
    init_tiny_model(
        model_dir,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        seed=cfg.seed,
        word_vocab=splits.vocabulary,
        arch=cfg.arch,
        num_experts=cfg.num_experts,
        experts_per_token=cfg.experts_per_token,
    )
    log.info("wrote the tiny model to %s", model_dir)
    (data_dir / DONE_FILE).write_text(json.dumps(cfg.model_dump(mode="json")) + "\n")


def main(argv: list[str] | None = None) -> None:
    from common.cli import Logs, add_config, run_cli, standalone

    def prepare(args: argparse.Namespace) -> int:
        prepare_tiny_demo(load_config(PrepareSection, args.config), Path(args.data_dir), Path(args.model_dir))
        return 0

    parser = standalone("python -m deploy.launcher.prepare", prepare, logs=Logs(prefix="prepare "), description=__doc__)
    add_config(parser, "TOML file of the [prepare] section", required=True)
    parser.add_argument("--data-dir", required=True, help="where the datasets go")
    parser.add_argument("--model-dir", required=True, help="where the tiny model goes")
    run_cli(parser, argv)


if __name__ == "__main__":
    main()
