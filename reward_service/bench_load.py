"""The reward bench's processes and load: servers on free ports, their CPU time, and a light HTTP load generator.

The load generator writes prebuilt HTTP/1.1 requests on keep-alive connections (asyncio streams, uvloop) and
reads Content-Length responses: an httpx client costs about as much CPU per request as the server under test,
and on a shared 2-core machine what the client burns is taken from the server.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import httpx
import psutil


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def start(name: str, cmd: list[str], port: int, log: IO[bytes], ready_path: str, timeout_s: float = 60.0) -> Server:
    """Run `cmd` (stdout discarded, stderr to `log`) and wait until GET `ready_path` gets any HTTP answer."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(f"{url}{ready_path}", timeout=1.0)
            return Server(name, url, proc)
        except httpx.TransportError:
            pass  # not listening yet
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} server did not start (exit code {proc.poll()}); see its stderr")
        time.sleep(0.1)


def stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)


def cpu_s(server: Server) -> float:
    """CPU seconds of the server process and its live children (worker processes) so far."""
    root = psutil.Process(server.proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _request(port: int, path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
    return head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError(f"response without content-length: {head[:200]!r}")
    return status, await reader.readexactly(length)


async def post_all(port: int, path: str, bodies: list[bytes], concurrency: int) -> list[float]:
    """POST every body with `concurrency` connections in flight; per-request latencies (s). RuntimeError on a
    status other than 200."""
    latencies: list[float] = []
    queue = iter(bodies)

    async def lane() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for body in queue:
                t0 = time.perf_counter()
                writer.write(_request(port, path, body))
                status, payload = await _read_response(reader)
                if status != 200:
                    raise RuntimeError(f"HTTP {status} from port {port}: {payload[:300]!r}")
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies


def client_job(port: int, path: str, bodies: list[bytes], concurrency: int) -> tuple[float, float, list[float]]:
    """One load-generator process's share of a round: when it began and ended (time.monotonic(), one clock for
    all processes) and its latencies. The clock starts once the bodies are here: shipping them to this process is
    not the server's time."""
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        start_s = time.monotonic()
        latencies = runner.run(post_all(port, path, bodies, concurrency))
        return start_s, time.monotonic(), latencies


class Load:
    """`clients` load-generator processes; `run` spreads one round's bodies and concurrency over them."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.pool = ProcessPoolExecutor(max_workers=clients, mp_context=multiprocessing.get_context("spawn"))

    def run(self, server: Server, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
        """Wall seconds of the round and its latencies."""
        n = self.clients
        futures = [
            self.pool.submit(client_job, server.port, "/evaluate", bodies[i::n], max(1, concurrency // n))
            for i in range(n)
        ]
        results = [f.result() for f in futures]
        wall_s = max(r[1] for r in results) - min(r[0] for r in results)
        return wall_s, [lat for r in results for lat in r[2]]

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown()
