"""`longtrace bench rollout`: what the rollout path costs on top of the engines.

Same run, same prompts, same sampling and the same number of requests in flight: (a) straight to 2 built-in
engines from an asyncio client, (b) through Redis -> rollout worker -> router -> engines -> Redis. The passes
alternate `repeats` times (in alternating order) after a warm-up. Every sample is exactly max_new_tokens
long (ignore_eos), so both paths do the same work. Prints samples_per_s (b), direct_samples_per_s (a) and
their ratio (target >= 0.9).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.base import ROLLOUTS, TASKS, Broker
from broker.embedded import EmbeddedRedis
from broker.schemas import Group, RewardInfo, Task, pack_ids
from common.config import load_config
from common.net import free_port
from rollout_server.launch import LaunchConfig, engine_command, terminate, wait_healthy
from rollout_server.worker.client import EngineClient, make_http_client
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.generation import plan_group
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.processors import get_processor
from rollout_server.worker.router import BuiltinRouter
from rollout_server.worker.worker import RolloutWorker

NUM_ENGINES = 2


@dataclass(frozen=True)
class BenchSpec:
    num_groups: int = 24
    num_samples: int = 4
    max_new_tokens: int = 64
    prompt_len: int = 48
    groups_in_flight: int = 4
    repeats: int = 4
    engine_threads: int = 1  # torch threads per engine: 2 engines on a 2-core machine


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    import subprocess

    from rollout_server.models import init_tiny_model

    with tempfile.TemporaryDirectory(prefix="longtrace-bench-") as tmp, EmbeddedRedis() as redis_server:
        model = init_tiny_model(Path(tmp) / "model")
        procs: list[subprocess.Popen[bytes]] = []
        urls: list[str] = []
        try:
            for _ in range(NUM_ENGINES):
                port = free_port()
                launch = LaunchConfig(
                    model_path=str(model), extra_args=["--num_threads", str(spec.engine_threads)]
                )  # fmt: skip
                procs.append(
                    subprocess.Popen(
                        engine_command(launch, port),
                        start_new_session=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                urls.append(f"http://127.0.0.1:{port}")
            for url, proc in zip(urls, procs, strict=True):
                if not wait_healthy(url, proc, timeout_s=180, probe_timeout_s=5):
                    raise RuntimeError(f"engine {url} did not start (exit code {proc.poll()})")
            return asyncio.run(_measure(spec, redis_server.url, urls))
        finally:
            for proc in procs:
                terminate(proc, 30)


def _config(spec: BenchSpec, redis_url: str, urls: list[str]) -> RolloutConfig:
    in_flight = spec.groups_in_flight * spec.num_samples
    return load_config(
        RolloutConfig,
        overrides=[
            f"--broker.redis_url={redis_url}",
            f"--broker.run_id=bench-{uuid.uuid4().hex[:8]}",
            "--broker.block_s=0.05",
            "--engines.use_registry=false",
            f"--engines.urls={list(urls)!r}".replace("'", '"'),
            f"--router.max_inflight_per_engine={math.ceil(in_flight / len(urls))}",
            f"--max_groups_in_flight={spec.groups_in_flight}",
            f"--sampling.num_samples={spec.num_samples}",
            f"--sampling.max_response_len={spec.max_new_tokens}",
            "--sampling.stop_token_ids=[]",
            "--sampling.ignore_eos=true",  # every sample exactly max_new_tokens: equal work on both paths
        ],
    )


def _tasks(spec: BenchSpec, vocab: int = 400) -> list[Task]:
    rng = random.Random(0)
    run = uuid.uuid4().hex[:8]
    return [
        Task(
            run_id="bench",
            group_id=f"bench-{run}-{i}",
            dataset_index=i,
            prompt_ids=pack_ids([rng.randrange(8, vocab) for _ in range(spec.prompt_len)]),
            label="",
            reward_info=RewardInfo(question=""),
            num_samples=spec.num_samples,
            policy_version=0,
        )
        for i in range(spec.num_groups)
    ]


async def _direct(spec: BenchSpec, cfg: RolloutConfig, urls: list[str], tasks: list[Task]) -> tuple[int, int, float]:
    """The same groups straight to the engines: `groups_in_flight` groups at once, each sending its n samples
    together (round robin over the engines), exactly the request pattern of the worker minus Redis and routing."""
    http = make_http_client()
    clients = [EngineClient(u, http, cfg.request_timeout_s, cfg.connect_timeout_s, cfg.health_timeout_s) for u in urls]
    group_slots = asyncio.Semaphore(spec.groups_in_flight)
    rr = itertools.cycle(clients)
    processor = get_processor(cfg.processor)

    async def group(task: Task) -> list[int]:
        plan = plan_group(task, cfg, processor)
        params = {**plan.sampling_params, "max_new_tokens": plan.max_new_tokens}
        async with group_slots:
            results = await asyncio.gather(
                *(next(rr).generate(plan.prompt_ids, params, f"d-{task.group_id}-{i}") for i in range(plan.num_samples))
            )
        return [len(r.output_ids) for r in results]

    t0 = time.perf_counter()
    tokens = [n for g in await asyncio.gather(*(group(t) for t in tasks)) for n in g]
    elapsed = time.perf_counter() - t0
    await http.aclose()
    return len(tokens), sum(tokens), elapsed


async def _through_worker(spec: BenchSpec, cfg: RolloutConfig, tasks: list[Task]) -> tuple[int, int, float]:
    from broker.factory import connect

    broker: Broker = connect(cfg.broker)
    router = BuiltinRouter(cfg, None)
    await router.start()
    stop = asyncio.Event()
    worker = RolloutWorker(cfg, broker, router, RolloutMetrics(), worker_id="bench-worker")
    running = asyncio.create_task(worker.run(stop))
    producer = broker.producer(TASKS, Task)
    consumer = broker.consumer(ROLLOUTS, Group, "bench-reader", "bench-reader")
    t0 = time.perf_counter()
    await asyncio.to_thread(producer.publish, tasks)
    seen: set[str] = set()
    num_samples = num_tokens = 0
    while len(seen) < len(tasks):
        entries = await asyncio.to_thread(consumer.read, 64, 0.05)
        for e in entries:
            seen.add(e.msg.group_id)
            num_samples += len(e.msg.samples)
            num_tokens += sum(len(s.response_ids_np()) for s in e.msg.samples)
        if entries:
            await asyncio.to_thread(consumer.ack, [e.id for e in entries])
        if running.done():
            running.result()  # a crashed worker: re-raise its error
    elapsed = time.perf_counter() - t0
    stop.set()
    await running
    await router.close()
    broker.close()
    return num_samples, num_tokens, elapsed


async def _measure(spec: BenchSpec, redis_url: str, urls: list[str]) -> dict[str, Any]:
    cfg = _config(spec, redis_url, urls)
    warm = BenchSpec(num_groups=2, num_samples=spec.num_samples, max_new_tokens=8, prompt_len=spec.prompt_len)
    await _direct(warm, cfg, urls, _tasks(warm))
    totals = {"direct": [0, 0, 0.0], "worker": [0, 0, 0.0]}
    pass_ratios = []
    for i in range(spec.repeats):
        rates = {}
        for name in ("direct", "worker") if i % 2 == 0 else ("worker", "direct"):  # cancel order effects
            cfg = _config(spec, redis_url, urls)  # a fresh run id: new streams, no dedup across passes
            tasks = _tasks(spec)
            if name == "direct":
                n, tok, s = await _direct(spec, cfg, urls, tasks)
            else:
                n, tok, s = await _through_worker(spec, cfg, tasks)
            totals[name][0] += n
            totals[name][1] += tok
            totals[name][2] += s
            rates[name] = n / s
        pass_ratios.append(round(rates["worker"] / rates["direct"], 3))
    d_n, d_tok, d_s = totals["direct"]
    w_n, w_tok, w_s = totals["worker"]
    return {
        "samples_per_s": round(w_n / w_s, 3),
        "direct_samples_per_s": round(d_n / d_s, 3),
        "ratio": round((w_n / w_s) / (d_n / d_s), 3),
        "tokens_per_s": round(w_tok / w_s, 1),
        "direct_tokens_per_s": round(d_tok / d_s, 1),
        "pass_ratios": pass_ratios,  # per alternation: how noisy the machine was
        "num_samples_per_pass": spec.num_groups * spec.num_samples,
        "repeats": spec.repeats,
        "engines": NUM_ENGINES,
        "in_flight_requests": spec.groups_in_flight * spec.num_samples,
        "max_new_tokens": spec.max_new_tokens,
        "cpus": os.cpu_count(),
    }
