"""`longtrace bench engine` at a tiny size: the engine against transformers' batched generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.dist import REPO_ROOT


def test_engine_bench_compares_against_batched_generate_on_both_workloads() -> None:
    """Guards against a bench whose baseline is weaker than it says (one prompt at a time as the headline) or whose
    numbers do not add up: the headline ratio must be the engine's mixed-length rate over batched generate's, the
    static batches must have generated tokens nobody asked for (mixed lengths), and the engine must have generated
    exactly the asked tokens (the bench raises otherwise)."""
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "bench", "engine", "--json", "--num-prompts", "8", "--concurrency", "4",
         "--new-tokens", "16", "--hidden-size", "64", "--num-layers", "1", "--baseline-prompts", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["baseline"].startswith("transformers generate, batches of 4, left-padded")
    assert r["ratio"] == round(r["tokens_per_s"] / r["baseline_tokens_per_s"], 2)
    assert r["ratio_uniform"] == round(r["uniform_tokens_per_s"] / r["uniform_baseline_tokens_per_s"], 2)
    assert 0 < r["baseline_wasted_fraction"] < 1, r
    assert r["mixed_new_tokens"] == [2, 16] and r["goal"] == 1.5
