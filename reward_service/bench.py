"""`longtrace bench reward`: /evaluate throughput of the service vs the upstream LongTraceRL reward server.

The upstream server is THU-KEG/LongTraceRL's `launch_server.py`, given with `--upstream PATH` (it is not part of
this repository) and run as published: `python PATH --host 127.0.0.1 --port P --base_url J --api_key stub`, with
this venv's interpreter (it imports fastapi, uvicorn, httpx and openai: `pip install openai`, or
`pip install --no-deps --target DIR_OF_PATH openai jiter`, which its script directory puts on sys.path). Both
servers judge with the LLM judge against the same OpenAI-compatible stub (`reward_service.bench_judge`, a process
of its own answering at once), so the comparison is of the servers' own work.

Workload: ~32 KB (~6K-word) responses in `<think>…</think>answer` form, 10 rubric entities each, in the upstream
request format (which /evaluate takes as is), `concurrency` requests in flight from `clients` load-generator
processes. Before timing, every distinct body is sent to both servers and the three reward parts must agree (same
formula, same judge verdicts). The timed requests run in short rounds alternating between the servers after a
warm-up of each (the machine is shared: both see the same load on average); every answer is made unique, so no
cache can help. CPU per request is the server process's CPU time, its worker processes included.

Without `--upstream` the bench says it has nothing to compare with and measures the service alone. With
`--judge_delay_s D` (e.g. 0.5) it then measures the service against a judge that serves `--judge_concurrency C`
calls at once after D seconds each, with twice C requests in flight, and reports `judge_ceiling_fraction` =
req/s ÷ (C / D), how close the service comes to the most a judge so limited allows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import httpx

from common.net import free_port
from common.progress import bar
from reward_service.bench_load import Load, Server, cpu_s, start, stop

NUM_RUBRICS = 10
RESPONSE_BYTES = 32 * 1024
NUM_BODIES = 32
ROUNDS = 6
REWARD_KEYS = ("reward", "outcome_reward", "rubric_reward")


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


def payloads(bodies: list[dict[str, Any]], num: int, tag: str) -> list[bytes]:
    """`num` request bodies cycling through `bodies`, each answer made unique by a leading "[tag-i]" (no
    server may profit from having seen a response before; the tag changes no reward)."""
    out = []
    for i in range(num):
        body = bodies[i % len(bodies)]
        response = body["response"].replace("</think>\n\n", f"</think>\n\n[{tag}-{i}] ", 1)
        out.append(json.dumps({**body, "response": response}).encode())
    return out


def check_agreement(servers: list[Server], bodies: list[dict[str, Any]]) -> int:
    """Both servers must give the same reward parts for every distinct body; the number of bodies checked."""
    checked = payloads(bodies, len(bodies), "check")
    with httpx.Client(timeout=120.0) as client:
        for payload in checked:
            results = []
            for s in servers:
                resp = client.post(f"{s.url}/evaluate", content=payload, headers={"content-type": "application/json"})
                resp.raise_for_status()
                results.append(resp.json())
            for key in REWARD_KEYS:
                if not math.isclose(results[0][key], results[1][key], rel_tol=1e-12, abs_tol=1e-12):
                    raise RuntimeError(f"{servers[0].name} and {servers[1].name} disagree on {key}: {results}")
    return len(checked)


def _pct_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 2)


def measure(
    servers: list[Server], load: Load, num_requests: int, concurrency: int, rounds: int = ROUNDS
) -> dict[str, dict[str, float]]:
    """Warm-up, then `rounds` rounds alternating between the servers; per server req/s, p50/p99 ms and CPU ms per
    request."""
    bodies = make_bodies()
    wall = {s.name: 0.0 for s in servers}
    cpu = {s.name: 0.0 for s in servers}
    lat: dict[str, list[float]] = {s.name: [] for s in servers}
    for s in servers:
        load.run(s, payloads(bodies, 4 * concurrency, f"warmup-{s.name}"), concurrency)
    per_round = max(concurrency, num_requests // rounds)
    done = 0
    turn = 0
    with bar(num_requests * len(servers), "bench reward", "req") as progress:  # timed requests, per round
        while done < num_requests:
            n = min(per_round, num_requests - done)
            order = servers if turn % 2 == 0 else servers[::-1]  # ABBA: neither always goes first
            for s in order:
                sent = payloads(bodies, n, f"r{done}")
                before = cpu_s(s)
                took, latencies = load.run(s, sent, concurrency)
                cpu[s.name] += cpu_s(s) - before
                wall[s.name] += took
                lat[s.name] += latencies
                progress.update(n)
            done += n
            turn += 1
    return {
        s.name: {
            "req_per_s": round(num_requests / wall[s.name], 1),
            "p50_ms": _pct_ms(lat[s.name], 0.5),
            "p99_ms": _pct_ms(lat[s.name], 0.99),
            "cpu_ms_per_request": round(cpu[s.name] / num_requests * 1e3, 3),
        }
        for s in servers
    }


def _ours(port: int, judge_port: int, processes: int, log: IO[bytes], judge_concurrency: int = 64) -> Server:
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port), "--judge.kind", "llm"]
    cmd += ["--judge.base_url", f"http://127.0.0.1:{judge_port}/v1", "--judge.api_key_env", ""]
    cmd += ["--judge.concurrency", str(judge_concurrency)]
    if processes != 1:
        cmd += ["--num_processes", str(processes)]
    return start("ours", cmd, port, log, "/health")


def _judge(port: int, log: IO[bytes], delay_s: float = 0.0, concurrency: int = 64) -> Server:
    cmd = [sys.executable, "-m", "reward_service.bench_judge", "--port", str(port)]
    cmd += ["--delay_s", str(delay_s), "--concurrency", str(concurrency)]
    return start("judge", cmd, port, log, "/health")


def _slow_judge(
    load: Load, log: IO[bytes], processes: int, delay_s: float, judge_concurrency: int, num_requests: int
) -> dict[str, Any]:
    """The service against a judge serving `judge_concurrency` calls at once after `delay_s` each."""
    judge = _judge(free_port(), log, delay_s, judge_concurrency)
    try:
        # the service's own judge.concurrency stays at its default (64): the judge's capacity is the judge's
        ours = _ours(free_port(), judge.port, processes, log)
        try:
            in_flight = 2 * judge_concurrency
            # one round: the judge's slots stay full from the first request to the last but `in_flight`
            got = measure([ours], load, num_requests, in_flight, rounds=1)["ours"]
        finally:
            stop(ours)
    finally:
        stop(judge)
    ceiling = judge_concurrency / delay_s
    return {
        "judge_delay_s": delay_s,
        "judge_concurrency": judge_concurrency,
        "slow_judge_concurrency": in_flight,
        "slow_judge_req_per_s": got["req_per_s"],
        "judge_ceiling_req_per_s": round(ceiling, 1),
        "judge_ceiling_fraction": round(got["req_per_s"] / ceiling, 3),
    }


def _check_upstream_imports(upstream: str) -> None:
    """The upstream server imports openai, which this project does not need: say how to get it, up front."""
    probe = subprocess.run(
        [sys.executable, "-c", "import openai"], cwd=os.path.dirname(os.path.abspath(upstream)), capture_output=True
    )
    if probe.returncode != 0:
        raise RuntimeError(
            f"the upstream server needs the openai package: `pip install openai`, or "
            f"`pip install --no-deps --target {os.path.dirname(os.path.abspath(upstream))} openai jiter`"
        )


def run_bench(
    num_requests: int = 1536,
    concurrency: int = 32,
    clients: int = 1,
    as_json: bool = False,
    upstream: str | None = None,
    processes: int = 1,
    judge_delay_s: float | None = None,
    judge_concurrency: int = 32,
    slow_requests: int = 1024,
    command: str = "",
) -> dict[str, Any]:
    """Run the bench and print its result (see the module docstring); also return it."""
    if num_requests < 1 or concurrency < 1 or not 1 <= clients <= concurrency:
        raise ValueError("--requests and --concurrency must be positive, --clients in [1, concurrency]")
    if upstream is not None and not Path(upstream).is_file():
        raise ValueError(f"--upstream {upstream!r}: no such file (LongTraceRL's launch_server.py)")
    if upstream is None:
        print(
            "no upstream to compare with (--upstream PATH of LongTraceRL's launch_server.py): the service alone",
            file=sys.stderr,
        )
    load_at_start = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was
    result: dict[str, Any] = {}
    with tempfile.TemporaryFile() as log, Load(clients) as load:
        servers: list[Server] = []
        try:
            servers.append(_judge(free_port(), log))
            judge_port = servers[0].port
            servers.append(_ours(free_port(), judge_port, processes, log))
            if upstream is not None:
                _check_upstream_imports(upstream)
                port = free_port()
                cmd = [sys.executable, upstream, "--host", "127.0.0.1", "--port", str(port)]
                cmd += ["--base_url", f"http://127.0.0.1:{judge_port}/v1", "--api_key", "stub"]
                servers.append(start("upstream", cmd, port, log, "/"))
                result["agreement_checked_bodies"] = check_agreement(servers[1:], make_bodies())
            got = measure(servers[1:], load, num_requests, concurrency)
            ours, up = got["ours"], got.get("upstream")
            result = {
                "req_per_s": ours["req_per_s"],
                "upstream_req_per_s": up["req_per_s"] if up else None,
                "ratio": round(ours["req_per_s"] / up["req_per_s"], 2) if up else None,
                "p50_ms": ours["p50_ms"],
                "p99_ms": ours["p99_ms"],
                "upstream_p50_ms": up["p50_ms"] if up else None,
                "upstream_p99_ms": up["p99_ms"] if up else None,
                "cpu_ms_per_request": ours["cpu_ms_per_request"],
                "upstream_cpu_ms_per_request": up["cpu_ms_per_request"] if up else None,
                "cpu_ratio": round(up["cpu_ms_per_request"] / ours["cpu_ms_per_request"], 2) if up else None,
                **result,
            }
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            for s in servers[::-1]:
                stop(s)
        if judge_delay_s is not None:
            result.update(_slow_judge(load, log, processes, judge_delay_s, judge_concurrency, slow_requests))
    result.update(
        {
            "command": command,
            "upstream_sha256": hashlib.sha256(Path(upstream).read_bytes()).hexdigest() if upstream else None,
            "host_cpus": os.cpu_count(),
            "load_avg_1m_at_start": load_at_start,
            "requests": num_requests,
            "concurrency": concurrency,
            "client_procs": clients,
            "num_processes": processes,
            "upstream": upstream,
            "response_kb": round(RESPONSE_BYTES / 1024, 1),
            "rubrics": NUM_RUBRICS,
            "judge": "stub OpenAI-compatible (reward_service.bench_judge), answers at once",
        }
    )
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result
