"""Training the same batch under several parallel layouts and comparing the runs (tests/integration/
test_trainer_parallel.py, test_context_parallel.py): each run writes its per-step metrics (rank 0) and every stage
leader its exported HF weights; `merged_weights` puts a run's stages back together, `tiny_hf_model` is the shared
model (tied embeddings: at PP2 the first and last stage each hold a copy whose gradients megatron all-reduces)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def tiny_hf_model(tmp: Path) -> Path:
    from rollout_server.models import init_tiny_model

    return init_tiny_model(tmp / "hf", hidden_size=64, num_layers=2, vocab_size=300, num_heads=4, num_kv_heads=2)


def train_and_record(
    cfg: Any, out: Path, name: str, make_batch: Callable[[int], Any], steps: int,
    before: Callable[[Any, Any, Any], None] | None = None,
) -> None:  # fmt: skip
    """`steps` steps on `make_batch(vocab)` under `cfg`'s layout; `before(learner, model, batch)` runs first."""
    import torch
    import torch.distributed as dist

    from learner.model.export import iter_hf_weights
    from learner.model.hf_config import load_hf_arch
    from learner.parallel import destroy_parallel, init_parallel
    from learner.train_step import Learner, build_model_and_optimizer

    layout = init_parallel(cfg.model)
    arch = load_hf_arch(cfg.model.hf_path)
    model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=True)
    learner = Learner(cfg, arch, layout, model, optimizer)
    batch = make_batch(arch.vocab_size)
    if before is not None:
        before(learner, model, batch)
    metrics = [learner.train_step(batch) for _ in range(steps)]
    weights = {k: v.clone() for k, v in iter_hf_weights(model, arch)}
    if weights:
        torch.save(weights, out / f"{name}-rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(metrics))
    destroy_parallel(keep_process_group=True)


def merged_weights(run_dir: Path, name: str) -> dict[str, Any]:
    import torch

    merged: dict[str, Any] = {}
    for part in sorted(run_dir.glob(f"{name}-rank*.pt")):
        merged |= torch.load(part)
    return merged
