"""`longtrace bench rollout`: what the rollout path costs on top of the engines, and what prefix sharing saves.

Same run, same prompts, same sampling and the same number of requests in flight, over three passes: (a) through
Redis -> rollout worker -> router -> 2 built-in engines -> Redis, (b) the same through 2 engines started with
`--enable_prefix_sharing false` (each sample prefills its group's prompt again, as before prefix sharing), (c)
straight to (a)'s engines from an asyncio client (the worker's transport, one engine per group, the same groups
in flight). The passes rotate `repeats` times (ORDERS) after a warm-up. Every sample is
exactly max_new_tokens long (ignore_eos), so all paths do the same work.

Prints samples_per_s (a), samples_per_s_no_sharing (b), their ratio, and prefill_ratio / prefill_ratio_no_sharing:
the prompt tokens the engines prefilled per group, as they report them per request (prompt_tokens - cached_tokens
of every answer, summed by the worker's `longtrace_rollout_prompt_tokens_total` / `_cached_tokens_total`), over
the prompt's length: 1 + (n - 1) / prompt_len when a group's n samples share one prefill (goal <= 1.1 at n = 8), n
when each sample prefills it. direct_samples_per_s (c) and worker_vs_direct (a / c, target >= 0.9) are what the
worker path costs: worker_vs_direct is the median of the per-rotation ratios (`worker_vs_direct_passes`, a and c
of one rotation), robust to a pass slowed by a neighbour on a shared machine; worker_vs_direct_totals is the ratio
of the totals. The warm-up runs both paths on both engine sets, so no measured pass pays first-use costs (imports,
Redis scripts, the engines' first requests).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
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
from common.progress import bar
from rollout_server.launch import LaunchConfig, engine_command, terminate, wait_healthy
from rollout_server.worker.client import EngineClient, make_engine_http
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.generation import plan_group
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.processors import get_processor
from rollout_server.worker.router import BuiltinRouter
from rollout_server.worker.worker import RolloutWorker

NUM_ENGINES = 2  # per pass kind: 2 with prefix sharing, 2 without
MODES = ("sharing", "no_sharing", "direct")  # direct: straight to the sharing engines
# The order of each rotation, in turn: the two passes worker_vs_direct compares run back to back (a neighbour's load
# changes little between them), each first half the time; no_sharing first or last half the time.
ORDERS = (
    ("sharing", "direct", "no_sharing"),
    ("no_sharing", "direct", "sharing"),
    ("direct", "sharing", "no_sharing"),
    ("no_sharing", "sharing", "direct"),
)


@dataclass(frozen=True)
class BenchSpec:
    num_groups: int = 24
    num_samples: int = 4
    max_new_tokens: int = 64
    prompt_len: int = 48
    groups_in_flight: int = 4
    repeats: int = 4
    engine_threads: int = 1  # torch threads per engine: engines on a 2-core machine


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    import subprocess

    from rollout_server.models import init_tiny_model

    with tempfile.TemporaryDirectory(prefix="longtrace-bench-") as tmp, EmbeddedRedis() as redis_server:
        model = init_tiny_model(Path(tmp) / "model")
        procs: list[subprocess.Popen[bytes]] = []
        urls: dict[bool, list[str]] = {True: [], False: []}  # by prefix sharing on/off
        try:
            for sharing in (True, False) * NUM_ENGINES:
                port = free_port()
                args = ["--num_threads", str(spec.engine_threads)]
                launch = LaunchConfig(
                    model_path=str(model),
                    context_length=spec.prompt_len + spec.max_new_tokens + 8,  # the engine wants total < context
                    extra_args=args if sharing else [*args, "--enable_prefix_sharing", "false"],
                )
                procs.append(
                    subprocess.Popen(
                        engine_command(launch, port),
                        start_new_session=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                urls[sharing].append(f"http://127.0.0.1:{port}")
            for url, proc in zip(urls[True] + urls[False], procs[::2] + procs[1::2], strict=True):
                if not wait_healthy(url, proc, timeout_s=180, probe_timeout_s=5):
                    raise RuntimeError(f"engine {url} did not start (exit code {proc.poll()})")
            return asyncio.run(_measure(spec, redis_server.url, urls[True], urls[False]))
        finally:
            for proc in procs:
                terminate(proc, 30)


def _config(spec: BenchSpec, redis_url: str, urls: list[str]) -> RolloutConfig:
    # Room for whole groups: the router keeps a group on one engine unless that engine is full.
    per_engine = math.ceil(spec.groups_in_flight / len(urls)) * spec.num_samples
    return load_config(
        RolloutConfig,
        overrides=[
            f"--broker.redis_url={redis_url}",
            f"--broker.run_id=bench-{uuid.uuid4().hex[:8]}",
            "--broker.block_s=0.05",
            "--engines.use_registry=false",
            f"--engines.urls={list(urls)!r}".replace("'", '"'),
            f"--router.max_inflight_per_engine={per_engine}",
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


async def _direct(
    spec: BenchSpec, cfg: RolloutConfig, urls: list[str], tasks: list[Task], progress: Any = None
) -> tuple[int, int, float]:
    """The same groups straight to the engines: `groups_in_flight` groups at once, each sending its n samples
    together to the engine with the fewest groups in flight, exactly the request pattern of the worker (one engine
    per group) minus Redis and routing. Each group done advances `progress` (a common.progress bar)."""
    http = make_engine_http()  # the worker's transport: the paths differ only in Redis, worker and router
    clients = [EngineClient(u, http, cfg.request_timeout_s, cfg.connect_timeout_s, cfg.health_timeout_s) for u in urls]
    group_slots = asyncio.Semaphore(spec.groups_in_flight)
    groups_on = dict.fromkeys(range(len(clients)), 0)
    processor = get_processor(cfg.processor)

    async def group(task: Task) -> list[int]:
        plan = plan_group(task, cfg, processor)
        params = {**plan.sampling_params, "max_new_tokens": plan.max_new_tokens}
        async with group_slots:
            e = min(groups_on, key=lambda k: groups_on[k])
            groups_on[e] += 1
            try:
                results = await asyncio.gather(
                    *(
                        clients[e].generate(plan.prompt_ids, params, f"d-{task.group_id}-{i}")
                        for i in range(plan.num_samples)
                    )
                )
            finally:
                groups_on[e] -= 1
        if progress is not None:
            progress.update()
        return [len(r.output_ids) for r in results]

    t0 = time.perf_counter()
    tokens = [n for g in await asyncio.gather(*(group(t) for t in tasks)) for n in g]
    elapsed = time.perf_counter() - t0
    await http.aclose()
    return len(tokens), sum(tokens), elapsed


async def _through_worker(
    spec: BenchSpec, cfg: RolloutConfig, tasks: list[Task], progress: Any = None
) -> tuple[int, int, float, float]:
    """(samples, response tokens, seconds, prompt tokens the engines prefilled: prompt - cached, as reported).
    Each read of finished groups advances `progress` by their number."""
    from broker.factory import connect

    broker: Broker = connect(cfg.broker)
    router = BuiltinRouter(cfg, None)
    await router.start()
    stop = asyncio.Event()
    metrics = RolloutMetrics()
    worker = RolloutWorker(cfg, broker, router, metrics, worker_id="bench-worker")
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
            if progress is not None:
                progress.update(len(entries))
        if running.done():
            running.result()  # a crashed worker: re-raise its error
    elapsed = time.perf_counter() - t0
    stop.set()
    await running
    await router.close()
    broker.close()
    reported = {
        k: metrics.registry.get_sample_value(f"longtrace_rollout_{k}_tokens_total") or 0.0 for k in ("prompt", "cached")
    }
    prefilled = reported["prompt"] - reported["cached"]
    return num_samples, num_tokens, elapsed, prefilled


async def _measure(spec: BenchSpec, redis_url: str, urls: list[str], no_sharing_urls: list[str]) -> dict[str, Any]:
    warm = BenchSpec(num_groups=2, num_samples=spec.num_samples, max_new_tokens=8, prompt_len=spec.prompt_len)
    for engines in (urls, no_sharing_urls):  # both paths: the worker's first pass also pays imports and Redis scripts
        await _direct(warm, _config(spec, redis_url, engines), engines, _tasks(warm))
        await _through_worker(warm, _config(warm, redis_url, engines), _tasks(warm))
    engines_of = {"sharing": urls, "no_sharing": no_sharing_urls, "direct": urls}
    totals = {m: [0, 0, 0.0] for m in MODES}
    prefilled = dict.fromkeys(MODES, 0.0)
    pass_ratios = []
    vs_direct = []  # worker (sharing) / direct per rotation: both ran on the same engines minutes apart at most
    with bar(spec.repeats * len(MODES) * spec.num_groups, "bench rollout", "group") as progress:  # measured groups
        for i in range(spec.repeats):
            rates = {}
            for name in ORDERS[i % len(ORDERS)]:  # rotate: cancel order effects
                engines = engines_of[name]
                cfg = _config(spec, redis_url, engines)  # a fresh run id: new streams, no dedup across passes
                tasks = _tasks(spec)
                if name == "direct":
                    n, tok, s = await _direct(spec, cfg, engines, tasks, progress)
                else:
                    n, tok, s, prefill = await _through_worker(spec, cfg, tasks, progress)
                    prefilled[name] += prefill
                totals[name][0] += n
                totals[name][1] += tok
                totals[name][2] += s
                rates[name] = n / s
            pass_ratios.append(round(rates["sharing"] / rates["no_sharing"], 3))
            vs_direct.append(round(rates["sharing"] / rates["direct"], 3))
    rate = {m: totals[m][0] / totals[m][2] for m in MODES}
    prompt_tokens = spec.num_groups * spec.repeats * spec.prompt_len  # per pass kind: one prompt per group

    def prefill_ratio(mode: str) -> float:
        return round(prefilled[mode] / prompt_tokens, 3)

    return {
        "samples_per_s": round(rate["sharing"], 3),
        "samples_per_s_no_sharing": round(rate["no_sharing"], 3),
        "ratio": round(rate["sharing"] / rate["no_sharing"], 3),
        "prefill_ratio": prefill_ratio("sharing"),
        "prefill_ratio_no_sharing": prefill_ratio("no_sharing"),
        "direct_samples_per_s": round(rate["direct"], 3),
        "worker_vs_direct": round(statistics.median(vs_direct), 3),
        "worker_vs_direct_totals": round(rate["sharing"] / rate["direct"], 3),
        "tokens_per_s": round(totals["sharing"][1] / totals["sharing"][2], 1),
        "pass_ratios": pass_ratios,  # sharing / no sharing per rotation: how noisy the machine was
        "worker_vs_direct_passes": vs_direct,
        "num_samples_per_pass": spec.num_groups * spec.num_samples,
        "num_samples_per_group": spec.num_samples,
        "prompt_len": spec.prompt_len,
        "repeats": spec.repeats,
        "engines": NUM_ENGINES,
        "in_flight_requests": spec.groups_in_flight * spec.num_samples,
        "max_new_tokens": spec.max_new_tokens,
        "cpus": os.cpu_count(),
    }
