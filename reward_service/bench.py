"""`longtrace bench reward`: /evaluate throughput of the service vs a naive reward server, same machine, same run.

Workload: responses of ~8K tokens (~32 KB of words) in `<think>…</think>answer` form, 10 rubric entities
each, rule judge, `concurrency` requests in flight from httpx.AsyncClients in `clients` load-generator
processes. Each server is a real uvicorn process on a free port: ours through `longtrace reward serve`,
the baseline through `reward_service.bench_baseline` (stdout to /dev/null). Before timing, every distinct
request is sent to both servers and the rewards must agree. The timed requests run in short rounds
alternating between the servers (the machine is shared, so both see the same load on average).
Prints req_per_s, p50_ms, p99_ms, baseline_req_per_s, baseline_p50_ms, baseline_p99_ms and
ratio = req_per_s / baseline_req_per_s; also each server's CPU time per request and their ratio, which
depend neither on the machine's other load nor on the client's cost.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import psutil

from common.net import free_port

NUM_RUBRICS = 10
RESPONSE_BYTES = 32 * 1024
NUM_BODIES = 32
ROUNDS = 4


def make_bodies(num: int = NUM_BODIES, seed: int = 0) -> list[dict[str, Any]]:
    """Distinct /evaluate bodies: a think block, then ~32 KB of answer text mentioning some of the 10 entities."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    bodies = []
    for i in range(num):
        entities = [f"{rng.choice(vocab).title()} {rng.choice(vocab).title()}" for _ in range(NUM_RUBRICS)]
        label = entities[-1]
        words: list[str] = []
        size = 0
        while size < RESPONSE_BYTES:
            w = rng.choice(vocab)
            if rng.random() < 0.08:
                w = w.capitalize() + rng.choice([",", ".", ";", ""])
            words.append(w)
            size += len(w) + 1
        for entity in rng.sample(entities, k=rng.randint(0, NUM_RUBRICS)):
            words.insert(rng.randrange(len(words)), entity)
        answer = " ".join(words) + (f"\n\nSo the answer is {label}." if i % 2 == 0 else "\n\nI cannot tell.")
        bodies.append(
            {
                "label": label,
                "extra_reward_info": {
                    "question": f"Which entity ends chain {i}?",
                    "rubrics": entities,
                    "dataset_name": "longqa",
                    "rubric_reward_ratio": 0.3,
                    "rubric_use_reasoning_content": False,
                    "rubric_use_content": True,
                },
                "response": f"<think>\nLet me trace the chain through {entities[0]}.\n</think>\n\n{answer}",
            }
        )
    return bodies


@dataclass
class _Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]


def _start(name: str, cmd: list[str], port: int, log: Any, timeout_s: float = 60.0) -> _Server:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return _Server(name, url, proc)
        except httpx.TransportError:
            pass  # not listening yet
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} server did not start (exit code {proc.poll()}); see its stderr")
        time.sleep(0.1)


def _stop(server: _Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)


async def _post_all(
    client: httpx.AsyncClient, url: str, payloads: list[bytes], concurrency: int
) -> tuple[float, list[float]]:
    """Send every payload with `concurrency` in flight; return wall seconds and per-request latencies."""
    latencies: list[float] = []
    queue = iter(payloads)

    async def lane() -> None:
        for payload in queue:
            start = time.perf_counter()
            resp = await client.post(url, content=payload, headers={"content-type": "application/json"})
            resp.raise_for_status()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def _cpu_s(server: _Server) -> float:
    times = psutil.Process(server.proc.pid).cpu_times()
    return float(times.user + times.system)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _payloads(bodies: list[dict[str, Any]], num: int, tag: str) -> list[bytes]:
    """`num` request bodies cycling through `bodies`, each answer made unique by a leading "[tag-i]" (no
    server may profit from having seen a response before; the tag changes no reward)."""
    out = []
    for i in range(num):
        body = bodies[i % len(bodies)]
        response = body["response"].replace("</think>\n\n", f"</think>\n\n[{tag}-{i}] ", 1)
        out.append(json.dumps({**body, "response": response}).encode())
    return out


def _client_job(url: str, payloads: list[bytes], concurrency: int) -> list[float]:
    """One load-generator process: send `payloads` through one httpx.AsyncClient; return the latencies."""

    async def main() -> list[float]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
            return (await _post_all(client, url, payloads, concurrency))[1]

    return asyncio.run(main())


def _load(
    pool: ProcessPoolExecutor, n: int, url: str, payloads: list[bytes], concurrency: int
) -> tuple[float, list[float]]:
    """Spread `payloads` and `concurrency` over the pool's `n` client processes; wall seconds and latencies."""
    start = time.perf_counter()
    futures = [pool.submit(_client_job, url, payloads[i::n], max(1, concurrency // n)) for i in range(n)]
    latencies = [lat for f in futures for lat in f.result()]
    return time.perf_counter() - start, latencies


def _check_agreement(servers: list[_Server], bodies: list[dict[str, Any]]) -> None:
    """Both servers must give the same reward parts for every distinct request."""
    with httpx.Client(timeout=120.0) as client:
        for payload in _payloads(bodies, len(bodies), "check"):
            results = []
            for s in servers:
                resp = client.post(f"{s.url}/evaluate", content=payload, headers={"content-type": "application/json"})
                resp.raise_for_status()
                results.append(resp.json())
            for key in ("reward", "outcome_reward", "rubric_reward"):
                if not math.isclose(results[0][key], results[1][key], rel_tol=1e-12, abs_tol=1e-12):
                    raise RuntimeError(f"servers disagree on {key}: {results}")


def _measure(servers: list[_Server], num_requests: int, concurrency: int, clients: int) -> dict[str, Any]:
    bodies = make_bodies()
    _check_agreement(servers, bodies)
    wall_s = {s.name: 0.0 for s in servers}
    cpu_s = {s.name: 0.0 for s in servers}
    latencies: dict[str, list[float]] = {s.name: [] for s in servers}
    # The load generator must not be the bottleneck: httpx costs about as much CPU per request as our server,
    # so the requests come from `clients` processes (one AsyncClient each, concurrency split between them).
    with ProcessPoolExecutor(max_workers=clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        for s in servers:
            _load(pool, clients, f"{s.url}/evaluate", _payloads(bodies, 2 * concurrency, "warmup"), concurrency)
        # Short alternating rounds: on a shared machine both servers then see the same load on average.
        per_round = max(concurrency, num_requests // ROUNDS)
        done = 0
        while done < num_requests:
            n = min(per_round, num_requests - done)
            for s in servers:
                payloads = _payloads(bodies, n, f"r{done}")
                cpu_before = _cpu_s(s)
                took, lat = _load(pool, clients, f"{s.url}/evaluate", payloads, concurrency)
                cpu_s[s.name] += _cpu_s(s) - cpu_before
                wall_s[s.name] += took
                latencies[s.name] += lat
            done += n
    ours_s, ours_lat = wall_s["ours"], latencies["ours"]
    base_s, base_lat = wall_s["baseline"], latencies["baseline"]
    rps, base_rps = num_requests / ours_s, num_requests / base_s
    return {
        "req_per_s": round(rps, 1),
        "p50_ms": round(_pct(ours_lat, 0.5) * 1e3, 2),
        "p99_ms": round(_pct(ours_lat, 0.99) * 1e3, 2),
        "baseline_req_per_s": round(base_rps, 1),
        "baseline_p50_ms": round(_pct(base_lat, 0.5) * 1e3, 2),
        "baseline_p99_ms": round(_pct(base_lat, 0.99) * 1e3, 2),
        "ratio": round(rps / base_rps, 2),
        # server CPU per request: independent of what else runs on the machine (and of the client's cost)
        "cpu_ms_per_req": round(cpu_s["ours"] / num_requests * 1e3, 3),
        "baseline_cpu_ms_per_req": round(cpu_s["baseline"] / num_requests * 1e3, 3),
        "cpu_ratio": round(cpu_s["baseline"] / max(cpu_s["ours"], 1e-9), 2),
        "requests": num_requests,
        "concurrency": concurrency,
        "client_procs": clients,
        "response_kb": round(sum(len(b["response"]) for b in bodies) / len(bodies) / 1024, 1),
        "rubrics": NUM_RUBRICS,
    }


def run_bench(num_requests: int = 384, concurrency: int = 32, clients: int = 4, as_json: bool = False) -> int:
    if num_requests < 1 or concurrency < 1 or not 1 <= clients <= concurrency:
        raise ValueError("--requests and --concurrency must be positive, --clients in [1, concurrency]")
    ours_port, base_port = free_port(), free_port()
    with tempfile.TemporaryFile() as log:
        servers: list[_Server] = []
        try:
            ours_cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(ours_port)]
            servers.append(_start("ours", ours_cmd + ["--judge.kind", "rule"], ours_port, log))
            base_cmd = [sys.executable, "-m", "reward_service.bench_baseline", "--port", str(base_port)]
            servers.append(_start("baseline", base_cmd, base_port, log))
            result = _measure(servers, num_requests, concurrency, clients)
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            for s in servers:
                _stop(s)
    if as_json:
        print(json.dumps(result))
    else:
        print(
            f"reward /evaluate, {result['response_kb']} KB responses, {NUM_RUBRICS} rubrics, concurrency {concurrency}:\n"
            f"  ours:     {result['req_per_s']} req/s  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms\n"
            f"  baseline: {result['baseline_req_per_s']} req/s  p50 {result['baseline_p50_ms']} ms"
            f"  p99 {result['baseline_p99_ms']} ms\n"
            f"  ratio:    {result['ratio']}x (server CPU per request: {result['cpu_ms_per_req']} vs "
            f"{result['baseline_cpu_ms_per_req']} ms, {result['cpu_ratio']}x)"
        )
    return 0
