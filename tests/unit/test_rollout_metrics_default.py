"""Rollout workers serve Prometheus /metrics by default (rollout_server/worker/metrics.py), several per host."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import httpx
import pytest

from broker.base import TASKS
from broker.memory import MemoryBroker
from broker.schemas import RewardInfo, SamplingParams, Task, pack_ids
from common.config import load_config
from common.net import free_port
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.worker import run_worker

SERVING = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def _task(group_id: str) -> Task:
    return Task(
        run_id="r",
        group_id=group_id,
        dataset_index=0,
        prompt_ids=pack_ids(list(range(16))),
        label="x",
        reward_info=RewardInfo(question="q"),
        sampling=SamplingParams(),
        num_samples=2,
        policy_version=0,
    )


def _metric(port: int, name: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, trust_env=False).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_two_workers_on_one_host_export_by_default(caplog: pytest.LogCaptureFixture) -> None:
    """Guards against rollout workers that export nothing unless told (the dashboard's worker panels would stay
    empty) and against two workers of one host colliding on the metrics port (the second would crash at start):
    two workers with the default config each serve `longtrace_rollout_*` on their own port, logged, and each counts
    the work (tasks without room are dead-lettered and counted), and both endpoints close with their worker."""
    assert RolloutConfig().metrics and RolloutConfig().metrics_port == 9400
    cfg = load_config(
        RolloutConfig,
        overrides=[
            "--engines.use_registry=false",
            f'--engines.urls=["http://127.0.0.1:{free_port()}"]',
            "--sampling.max_context_len=16",  # every task is dead-lettered at once: no engine needed
            "--broker.block_s=0.05",
        ],
    )
    broker = MemoryBroker()
    broker.producer(TASKS, Task).publish([_task("g0"), _task("g1"), _task("g2"), _task("g3")])

    async def main() -> list[int]:
        stop = asyncio.Event()
        workers = [asyncio.create_task(run_worker(cfg, broker, stop, handle_signals=False)) for _ in range(2)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        ports: list[int] = []
        while loop.time() < deadline:
            ports = [int(m.group(1)) for r in caplog.records if (m := SERVING.search(r.getMessage()))]
            dead = [await asyncio.to_thread(_metric, p, "longtrace_rollout_dead_letters_total") for p in ports]
            if len(ports) == 2 and sum(d or 0 for d in dead) >= 4:
                break
            assert not any(w.done() for w in workers), [w.exception() for w in workers if w.done()]
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
        return ports

    with caplog.at_level(logging.INFO, logger="rollout_server.worker.metrics"):
        ports = asyncio.run(main())
    assert len(ports) == 2 and ports[0] != ports[1], ports
    assert all(9400 <= p < 9400 + cfg.metrics_port_span for p in ports) or any(
        "are taken" in r.getMessage() for r in caplog.records
    )
    for port in ports:  # closed with the worker: the port is free again
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # our scrapes' connections may be in TIME_WAIT
            s.bind(("127.0.0.1", port))


def test_a_taken_port_moves_to_the_next_one() -> None:
    """Guards against a worker crashing (EADDRINUSE) because another process holds its metrics port: it takes the
    next free port of the span, and past the span one the OS picks."""
    base = free_port()
    first, second, third = RolloutMetrics(), RolloutMetrics(), RolloutMetrics()
    try:
        assert first.serve("127.0.0.1", base, span=2) == base
        assert second.serve("127.0.0.1", base, span=2) not in (0, base)  # base + 1 unless another process holds it
        assert third.serve("127.0.0.1", base, span=1) not in (0, base, second.port)  # past the span: the OS picks
        for m in (first, second, third):
            assert _metric(m.port, "longtrace_rollout_in_flight_groups") == 0
    finally:
        for m in (first, second, third):
            m.close()
