"""`longtrace bench weight-sync`: one full weight push to one built-in engine vs a raw broadcast of the same bytes.

The learner side is this process (a ~125M-parameter Qwen3 built from a config, ~500 MB in fp32); the engine
is a child process running the real built-in engine and its SGLang API, plus one bench-only route,
`/bench/raw_broadcast`, that receives one flat buffer on the same weight-update group. Both transfers have
the same shape: post the request without waiting, broadcast from rank 0, await the reply. The flat buffer is
preallocated and reused (the fastest possible receive); the push goes through the engine's real receive path.
Rounds alternate push and raw; medians are reported.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.progress import bar

logger = logging.getLogger(__name__)

RAW_ROUTE = "/bench/raw_broadcast"


def _engine_env(backend: str) -> dict[str, str]:
    """The engine child's environment. With NCCL it gets the second GPU when there is one; on a single GPU the
    two processes get different NCCL host ids, since NCCL refuses two ranks of one communicator on one device
    ("Duplicate GPU detected") and otherwise uses its socket transport, as between nodes."""
    import os

    import torch

    env = dict(os.environ)
    if backend == "nccl":
        if torch.cuda.device_count() >= 2:
            env["CUDA_VISIBLE_DEVICES"] = "1"
        else:
            os.environ["NCCL_HOSTID"] = "longtrace-bench-learner"  # read by NCCL when the group is built
            env["NCCL_HOSTID"] = "longtrace-bench-engine"
    return env


def run_weight_sync_bench(
    hidden_size: int = 768,
    num_layers: int = 12,
    vocab_size: int = 50000,
    rounds: int = 3,
    bucket_mb: int = 512,
    backend: str = "auto",
    startup_timeout_s: float = 600.0,
) -> dict[str, Any]:
    import httpx
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from learner.weight_sync.config import DistributedSyncConfig
    from learner.weight_sync.distributed import DistributedWeightSync
    from learner.weight_sync.group import free_port, resolve_backend
    from learner.weight_sync.sources import HFModelSource
    from rollout_server.models import init_tiny_model

    if rounds < 1:
        raise ValueError("--rounds must be >= 1")
    backend = resolve_backend(backend)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="longtrace-wsync-bench-") as tmp:
        model_dir = init_tiny_model(
            Path(tmp) / "model", hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size, seed=0
        )
        port = free_port("127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "experiments.bench_weight_sync", str(model_dir), str(port), backend]
        proc = subprocess.Popen(
            cmd, env=_engine_env(backend), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        sync: DistributedWeightSync | None = None
        try:
            _wait_healthy(url, proc, startup_timeout_s)
            loaded: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model = loaded.to(device)
            cfg = DistributedSyncConfig(engine_urls=[url], use_registry=False, bucket_mb=bucket_mb, backend=backend)
            sync = DistributedWeightSync(cfg, HFModelSource(model_dir))
            total = sum(p.numel() for p in model.parameters())
            flat = torch.ones(total, dtype=torch.float32, device=device)
            client = sync.client
            assert client is not None and sync.group is not None

            def raw_broadcast() -> float:
                assert client is not None and sync is not None and sync.group is not None
                group, name = sync.group.process_group, sync.group.name
                body = {"group_name": name, "numel": total, "dtype": "float32"}
                t0 = time.perf_counter()
                reply = client.submit(client.call, url, RAW_ROUTE, body, 600.0)
                dist.broadcast(flat, group=group, group_src=0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                reply.result(timeout=600)
                return time.perf_counter() - t0

            sync.state.step = 1  # push() publishes the learner's step as the policy version
            first = sync.push(model)  # builds the group; the engine's first receive touches fresh memory
            if not first.ok:
                raise RuntimeError(f"weight push failed: {first.failed}")
            raw_broadcast()  # the engine allocates (and touches) its flat buffer once
            pushes, raws = [], []
            with bar(rounds, "bench weight-sync", "round") as progress:  # timed push/raw pairs, between rounds
                for i in range(rounds):
                    sync.state.step = 2 + i
                    pushes.append(sync.push(model))
                    raws.append(raw_broadcast())
                    progress.update()
            if not all(r.ok for r in pushes):
                raise RuntimeError(f"weight push failed: {[r.failed for r in pushes]}")
            version = httpx.get(url + "/get_model_info", timeout=30).json()["weight_version"]
            assert version == str(1 + rounds), f"engine reports version {version!r}"
        finally:
            if sync is not None:
                sync.close()
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    nbytes = pushes[0].bytes
    push_s = statistics.median(r.transfer_s for r in pushes)
    raw_s = statistics.median(raws)
    gb_per_s = nbytes / push_s / 1e9
    raw_gb_per_s = nbytes / raw_s / 1e9
    return {
        "bench": "weight-sync",
        "backend": backend,
        "bytes": nbytes,
        "num_params": total,
        "bucket_mb": bucket_mb,
        "rounds": rounds,
        "gb_per_s": round(gb_per_s, 3),
        "raw_gb_per_s": round(raw_gb_per_s, 3),
        "ratio": round(gb_per_s / raw_gb_per_s, 3),
        "transfer_s": round(push_s, 4),
        "raw_s": round(raw_s, 4),
        "pause_to_continue_s": round(statistics.median(r.pause_to_continue_s for r in pushes), 4),
        "push_total_s": round(statistics.median(r.total_s for r in pushes), 4),
    }


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"bench engine exited with {proc.returncode}: {err[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench engine at {url} not healthy within {timeout_s:g}s")
        time.sleep(0.2)


def _serve_engine(model_dir: str, port: int, backend: str) -> None:
    """The bench's engine process: the built-in engine plus a raw receive into one preallocated flat buffer."""
    import asyncio

    import torch
    import torch.distributed as dist
    import uvicorn
    from fastapi import Body

    from rollout_server.engine.api import build_app
    from rollout_server.engine.config import EngineConfig
    from rollout_server.engine.engine import Engine

    device = "cuda" if backend == "nccl" else "cpu"
    engine = Engine(
        EngineConfig(model_path=model_dir, port=port, device=device, max_running_requests=1, context_length=64)
    )
    engine.start()
    app = build_app(engine)
    buffers: dict[tuple[int, str], torch.Tensor] = {}

    @app.post(RAW_ROUTE)
    async def raw_broadcast(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        group = engine.receiver.group(body["group_name"])
        key = (int(body["numel"]), str(body["dtype"]))
        if key not in buffers:
            buffers[key] = torch.empty(key[0], dtype=getattr(torch, key[1]), device=device)
        buf = buffers[key]

        def receive() -> None:
            dist.broadcast(buf, group=group, group_src=0)
            if buf.is_cuda:
                torch.cuda.synchronize()

        await asyncio.to_thread(receive)
        return {"success": True, "message": "received"}

    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    _serve_engine(sys.argv[1], int(sys.argv[2]), sys.argv[3])
