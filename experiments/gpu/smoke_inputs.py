"""The inputs of the GPU smoke test (experiments/gpu/smoke.py), written into its work directory: a tiny word-level
Qwen3 model, a dataset the untrained model can sometimes answer, and the learner's TOML (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

RUN_ID = "smoke"
"""The broker namespace of the smoke run (the learner's TOML names it; smoke.py watches its dead stream)."""
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue north south east west"
).split()


def write_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, Path, list[int]]:
    """A tiny word-level Qwen3, a dataset whose labels are words the untrained model emits by chance, and the
    model's stop ids (Qwen3's 151643/151645 lie outside the tiny vocabulary)."""
    import random

    from transformers import AutoTokenizer

    from datagen.dataset import make_row, write_rows
    from rollout_server.models import init_tiny_model

    model = init_tiny_model(
        work / "model",
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        vocab_size=1,
        word_vocab=WORDS,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=1024,
    )
    rng = random.Random(0)
    rows = []
    for i in range(64):
        docs = " ".join(rng.choices(WORDS, k=24))
        label = rng.choice(WORDS[:6])  # six labels: some samples of a group match, some do not
        rows.append(make_row(f"documents {docs} question {label}", label, f"q{i}", [label], "smoke"))
    write_rows(work / "data.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(model)
    stop_ids = []
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(token_id, int), (token, token_id)
        stop_ids.append(token_id)
    return model, work / "data.jsonl", stop_ids


def learner_toml(
    work: Path, model: Path, data: Path, redis_url: str, engine_url: str, args: argparse.Namespace
) -> Path:
    backend = "gloo" if args.cpu else "nccl"
    dtype = "fp32" if args.cpu else args.dtype
    text = f"""run_dir = "{work / "run"}"
max_steps = {args.steps}
[model]
hf_path = "{model}"
tp_size = {args.learner_ranks}
dtype = "{dtype}"
dist_timeout_s = 120
[broker]
redis_url = "{redis_url}"
run_id = "{RUN_ID}"
[data]
dataset_path = "{data}"
groups_per_step = 4
num_samples = 4
max_staleness = 1
max_new_tokens = {args.max_new_tokens}
max_total_tokens = 512
[batch]
max_tokens_per_micro_batch = 1024
read_block_s = 0.5
batch_timeout_s = {args.timeout_s}
[optim]
lr = 1e-4
[checkpoint]
interval_steps = {args.steps}
[weight_sync]
type = "distributed"
backend = "{backend}"
engine_urls = ["{engine_url}"]
use_registry = false
master_address = "127.0.0.1"
init_timeout_s = 60
broadcast_timeout_s = 60
"""
    path = work / "learner.toml"
    path.write_text(text)
    return path
