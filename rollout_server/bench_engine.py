"""`longtrace bench engine`: generated tokens/s of the built-in engine over HTTP against transformers' own batched
`model.generate` on the same model, prompts and batch size, in the same run.

The baseline is the strongest simple one: `generate` on `concurrency` prompts at once, left-padded with an
attention mask (static batching), not one prompt at a time. Workloads, each timed on both sides:
- `mixed` (the headline `ratio`): each prompt asks for its own number of tokens, uniform in
  [new_tokens/8, new_tokens], as a rollout's responses differ in length. A static batch runs until its longest
  request is done; the baseline is credited only with the tokens each prompt asked for (what it generates past
  them is waste a user of `generate` pays for). The engine admits a new request as soon as one finishes.
- `uniform`: every prompt asks for `new_tokens` (`ratio_uniform`): static batching's best case, the raw speed of
  the two forward paths.
`ratio_one_at_a_time` keeps the old, weaker comparison (unbatched `generate`) for reference. Both sides sample at
T=1 with every asked token generated (ignore_eos / min_new_tokens). Prompts are random ids of 64-256 tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import tempfile
import time
from typing import Any

from common.progress import bar

log = logging.getLogger(__name__)

_SAMPLING = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)


def _prompts(num: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(64, 256))] for _ in range(num)]


def _budgets(num: int, new_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed + 1)
    return [rng.randint(max(1, new_tokens // 8), new_tokens) for _ in range(num)]


def _load_hf(model_dir: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def _hf_batched(
    model: Any, prompts: list[list[int]], budgets: list[int], batch_size: int, progress: Any = None
) -> tuple[int, int, float]:
    """(asked tokens, generated tokens, seconds) of `generate` over left-padded batches of `batch_size`; each
    batch done advances `progress` (a common.progress bar) by its prompts."""
    import torch

    asked = generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch, want = prompts[i : i + batch_size], budgets[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            steps = max(want)  # a static batch runs until its longest request is done
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, **_SAMPLING
            )
            generated += (out.shape[1] - width) * len(batch)
            asked += sum(want)
            if progress is not None:
                progress.update(len(batch))
    return asked, generated, time.perf_counter() - start


def _hf_one_at_a_time(model: Any, prompts: list[list[int]], new_tokens: int, progress: Any = None) -> float:
    import torch

    start, total = time.perf_counter(), 0
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, **_SAMPLING)
            total += out.shape[1] - len(p)
            if progress is not None:
                progress.update()
    return total / (time.perf_counter() - start)


async def _drive(
    url: str, prompts: list[list[int]], budgets: list[int], concurrency: int, progress: Any = None
) -> tuple[int, float]:
    """(tokens generated, seconds) of every prompt sent with `concurrency` in flight; each answer advances
    `progress`."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:

        async def one(p: list[int], n: int) -> int:
            params = {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True}
            async with sem:
                r = await client.post("/generate", json={"input_ids": p, "sampling_params": params})
                r.raise_for_status()
                if progress is not None:
                    progress.update()
                return int(r.json()["meta_info"]["completion_tokens"])

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, budgets, strict=True)))
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
    prompts = _prompts(num_prompts, vocab_size, seed)
    workloads = {"mixed": _budgets(num_prompts, new_tokens, seed), "uniform": [new_tokens] * num_prompts}
    hf: dict[str, tuple[int, int, float]] = {}
    engine_rates: dict[str, float] = {}
    # one bar over the timed prompts: HF generate on both workloads, the one-at-a-time baseline, then the engine
    total = 2 * len(workloads) * num_prompts + min(baseline_prompts, num_prompts)
    with (
        tempfile.TemporaryDirectory(prefix="longtrace-bench-engine-") as tmp,
        bar(total, "bench engine", "prompt") as b,
    ):
        model_dir = str(
            init_tiny_model(tmp, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, seed=seed)
        )
        model = _load_hf(model_dir)
        _hf_batched(model, prompts[:2], [4, 4], 2)  # warm-up
        for name, budgets in workloads.items():
            hf[name] = _hf_batched(model, prompts, budgets, concurrency, b)
            log.info("HF generate, batches of %d, %s: %.1f asked tok/s", concurrency, name, hf[name][0] / hf[name][2])
        one_at_a_time = _hf_one_at_a_time(model, prompts[:baseline_prompts], new_tokens, b)
        del model
        config = EngineConfig(
            model_path=model_dir, max_running_requests=concurrency, context_length=512, num_threads=threads
        )
        engine = Engine(config)
        engine.start()
        try:
            with BackgroundServer(build_app(engine)) as server:
                asyncio.run(_drive(server.url, prompts[:2], [4, 4], concurrency))  # warm-up
                for name, budgets in workloads.items():
                    tokens, elapsed = asyncio.run(_drive(server.url, prompts, budgets, concurrency, b))
                    if tokens != sum(budgets):
                        raise RuntimeError(f"the engine generated {tokens} tokens, {sum(budgets)} were asked")
                    engine_rates[name] = tokens / elapsed
                    log.info("engine at concurrency %d, %s: %.1f tok/s", concurrency, name, engine_rates[name])
        finally:
            engine.shutdown()
    baseline = {name: asked / s for name, (asked, _, s) in hf.items()}
    asked, generated, _ = hf["mixed"]
    return {
        "bench": "engine",
        "tokens_per_s": round(engine_rates["mixed"], 1),
        "baseline_tokens_per_s": round(baseline["mixed"], 1),
        "ratio": round(engine_rates["mixed"] / baseline["mixed"], 2),
        "goal": 1.5,
        "uniform_tokens_per_s": round(engine_rates["uniform"], 1),
        "uniform_baseline_tokens_per_s": round(baseline["uniform"], 1),
        "ratio_uniform": round(engine_rates["uniform"] / baseline["uniform"], 2),
        "baseline_wasted_fraction": round(1 - asked / generated, 3),
        "one_at_a_time_tokens_per_s": round(one_at_a_time, 1),
        "ratio_one_at_a_time": round(engine_rates["uniform"] / one_at_a_time, 2),
        "baseline": f"transformers generate, batches of {concurrency}, left-padded; tokens counted as asked",
        "concurrency": concurrency,
        "num_prompts": num_prompts,
        "baseline_prompts": baseline_prompts,
        "new_tokens": new_tokens,
        "mixed_new_tokens": [max(1, new_tokens // 8), new_tokens],
        "model": {"arch": "qwen3", "hidden_size": hidden_size, "num_layers": num_layers, "vocab_size": vocab_size},
        "threads": threads,
    }
