"""The per-GPU memory model behind docs/deploy.md's table (learner/memory_model.py) against the committed run of
`longtrace bench learner-memory` (docs/results/learner_memory.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from learner.memory_model import WORKING_SET_FACTOR, Dims, activation_bytes_per_token, per_gpu_gb

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "learner_memory.json"


def _bench_dims(env: dict[str, object]) -> Dims:
    heads, rest = str(env["heads"]).split(" (")
    kv_heads = int(rest.split(" KV")[0])
    head_dim = int(str(env["heads"]).rsplit("head_dim ", 1)[1])
    return Dims(
        hidden=int(str(env["hidden_size"])), ffn=int(str(env["intermediate_size"])), layers=int(str(env["num_layers"])),
        heads=int(heads), kv_heads=kv_heads, head_dim=head_dim, vocab=int(str(env["vocab_size"])),
        params=float(str(env["params"])),
    )  # fmt: skip


def _activation_slope(result: dict[str, Any]) -> tuple[float, tuple[int, int]]:
    """Bytes per token of the new path's activation tensor peak between its two longest one-rank lengths: where
    a recomputed layer's working set, not the fixed logprob chunks, sets the peak."""
    points = [p for p in result["points"] if p["path"] == "new" and p["nproc"] == 1 and p.get("ranks")]
    (n0, a0), (n1, a1) = sorted((p["seq_len"], p["ranks"][0]["activation_peak_mb"]) for p in points)[-2:]
    return (a1 - a0) * 2**20 / (n1 - n0), (n0, n1)


def test_working_set_factor_reproduces_the_measured_bytes_per_token() -> None:
    """Guards against the docs' memory table drifting from the measurement it claims to come from: the model's
    bytes per token for the bench's model (fp32, TP1, full recompute) must match the new path's measured slope of
    activation tensor bytes in the committed bench run within 15 %, and the baseline must really grow faster."""
    result = json.loads(RESULTS.read_text())
    dims = _bench_dims(result["environment"])
    modelled = activation_bytes_per_token(dims, tp=1, pp=1, sp=False, dtype_bytes=4, factor=WORKING_SET_FACTOR)
    measured, lengths = _activation_slope(result)
    assert abs(modelled - measured) <= 0.15 * measured, (modelled, measured, lengths)
    assert result["fit"]["baseline"]["bytes_per_token"] > 10 * measured


def test_per_gpu_memory_shrinks_with_cp_and_tp() -> None:
    """Guards the model's layout arithmetic: more CP ranks must cut the activations in proportion, TP the model
    states, and the parts must add up to the total."""
    qwen3_4b = Dims(hidden=2560, ffn=9728, layers=36, heads=32, kv_heads=8, head_dim=128, vocab=151936, params=4.02e9)
    cp1 = per_gpu_gb(qwen3_4b, tp=4, pp=2, cp=1, dp=1, seq_tokens=160_000, chunk_mb=512)
    cp4 = per_gpu_gb(qwen3_4b, tp=4, pp=2, cp=4, dp=1, seq_tokens=160_000, chunk_mb=512)
    assert abs(cp4["activations_gb"] * 4 - cp1["activations_gb"]) <= 0.4
    assert cp4["model_states_gb"] == cp1["model_states_gb"]
    tp8 = per_gpu_gb(qwen3_4b, tp=8, pp=2, cp=4, dp=1, seq_tokens=160_000, chunk_mb=512)
    assert tp8["model_states_gb"] < cp4["model_states_gb"]
    parts = cp4["model_states_gb"] + cp4["activations_gb"] + cp4["head_gb"]
    assert abs(parts - cp4["total_gb"]) <= 0.2
