"""`longtrace bench engine`: generated tokens/s of the built-in engine at concurrency 16 over HTTP, against
one-at-a-time transformers `model.generate` on the same model and prompts, in the same run.

Both sides sample at T=1 with every token forced to be generated (ignore_eos / min_new_tokens), so
they produce the same number of tokens per prompt. Prompts are random token ids of 64-256 tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import tempfile
import time
from typing import Any

log = logging.getLogger(__name__)


def _prompts(num: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(64, 256))] for _ in range(num)]


def _baseline(model_dir: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of HF generate, one prompt at a time (after a warm-up call)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=4, min_new_tokens=4, **kwargs)
        start = time.perf_counter()
        total = 0
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            total += out.shape[1] - len(p)
        return total / (time.perf_counter() - start)


async def _drive(url: str, prompts: list[list[int]], new_tokens: int, concurrency: int) -> tuple[int, float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:

        async def one(p: list[int]) -> int:
            async with sem:
                r = await client.post("/generate", json={"input_ids": p, "sampling_params": params})
                r.raise_for_status()
                return int(r.json()["meta_info"]["completion_tokens"])

        await one(prompts[0][:16])  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - start


def run_bench(
    hidden_size: int = 256,
    num_layers: int = 4,
    concurrency: int = 16,
    num_prompts: int = 32,
    baseline_prompts: int = 6,
    new_tokens: int = 128,
    threads: int = 0,
    vocab_size: int = 2048,
    seed: int = 0,
) -> dict[str, Any]:
    import torch

    from rollout_server.engine.api import build_app
    from rollout_server.engine.config import EngineConfig
    from rollout_server.engine.engine import Engine
    from rollout_server.engine.server import BackgroundServer
    from rollout_server.models import init_tiny_model

    # Half the cores by default: the engine's HTTP loop and the load generator share this process.
    threads = threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="longtrace-bench-engine-") as tmp:
        model_dir = str(
            init_tiny_model(tmp, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, seed=seed)
        )
        prompts = _prompts(num_prompts, vocab_size, seed)
        baseline = _baseline(model_dir, prompts[:baseline_prompts], new_tokens)
        log.info("baseline (HF generate, one at a time): %.1f tok/s", baseline)
        config = EngineConfig(
            model_path=model_dir, max_running_requests=concurrency, context_length=512, num_threads=threads
        )
        engine = Engine(config)
        engine.start()
        try:
            with BackgroundServer(build_app(engine)) as server:
                tokens, elapsed = asyncio.run(_drive(server.url, prompts, new_tokens, concurrency))
        finally:
            engine.shutdown()
    rate = tokens / elapsed
    log.info("engine at concurrency %d: %.1f tok/s", concurrency, rate)
    return {
        "bench": "engine",
        "tokens_per_s": round(rate, 1),
        "baseline_tokens_per_s": round(baseline, 1),
        "ratio": round(rate / baseline, 2),
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "baseline_prompts": baseline_prompts,
        "new_tokens": new_tokens,
        "model": {"arch": "qwen3", "hidden_size": hidden_size, "num_layers": num_layers, "vocab_size": vocab_size},
        "threads": threads,
    }
