"""common/http1.py, the lean keep-alive client the rollout worker talks to its engines with, and EngineClient over it:
the errors it raises must keep their meaning to the router (retry elsewhere, dead engine, rejected request)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from common.http1 import Http1Client, HttpTransportError, HttpUnreachable
from rollout_server.worker.client import EngineClient, EngineError, EngineOverloaded, RequestRejected, make_engine_http

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GENERATE_OK = (
    b'{"text":"a","output_ids":[7],"meta_info":{"finish_reason":{"type":"length"},'
    b'"output_token_logprobs":[[-0.5,7,null]],"prompt_tokens":3,"cached_tokens":1}}'
)


def _response(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)  # fmt: skip
    return head + await reader.readexactly(length)


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_keep_alive_reuses_one_connection_and_reads_every_framing() -> None:
    """Guards against a client that opens a connection per request (what keep-alive saves) or misreads a body:
    Content-Length, chunked and close-delimited (several TCP writes) bodies all arrive whole."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                request = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            if b"/chunked" in request:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            elif b"/close" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nfirst-")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"second")
                await writer.drain()
                break
            else:
                writer.write(_response(request.split(b"\r\n\r\n", 1)[1] or b"empty", extra="x-a: 1\r\n"))
            await writer.drain()
        writer.close()

    async def main() -> None:
        server, url = await _serve(handler)
        async with server, Http1Client() as http:
            first = await http.post(f"{url}/echo", content=b'{"a":1}', timeout=5)
            second = await http.get(f"{url}/x", timeout=5)
            chunked = await http.get(f"{url}/chunked", timeout=5)
            assert (first.status_code, first.content, first.headers["x-a"]) == (200, b'{"a":1}', "1")
            assert second.text == "empty" and chunked.content == b"abcde"
            assert connections == 1
            closed = await http.get(f"{url}/close", timeout=5)
            assert closed.content == b"first-second"

    asyncio.run(main())


def test_a_pooled_connection_the_server_closed_is_replaced_not_reported() -> None:
    """Guards against an idle keep-alive connection closed by the engine (its keep-alive timeout) failing the next
    request: that would count as an engine failure toward the breaker and move the sample elsewhere."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(reader)
        served += 1
        writer.write(_response(GENERATE_OK))  # keep-alive advertised, then closed anyway (idle timeout)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, url = await _serve(handler)
        async with server, Http1Client() as http:
            client = EngineClient(url, http, 5, 5, 5)
            for i in range(3):
                assert (await client.generate([1, 2], {}, f"r{i}")).output_ids == [7]
            assert served == 3

    asyncio.run(main())


def test_errors_keep_their_meaning_for_the_router() -> None:
    """Guards against the transport swap changing what the router does: no listener is "unreachable" to the
    health probe (the engine is gone) and an EngineError to /generate; a silent engine times out (EngineError,
    "unhealthy"); 4xx is RequestRejected, 503 with Retry-After is EngineOverloaded, other 5xx EngineError."""
    answers = {
        b"/s4": _response(b"bad", "422 Unprocessable"),
        b"/s5": _response(b"busy", "503 Busy", "retry-after: 2\r\n"),
        b"/s6": _response(b"oops", "500 Error"),
    }

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        path = request.split(b" ")[1]
        if path.startswith(b"/silent"):
            await asyncio.sleep(10)
        elif path.startswith(b"/hangup"):
            writer.close()
            return
        writer.write(answers[path.rsplit(b"/", 1)[0]])
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, url = await _serve(handler)
        dead = _dead_url()
        async with server, make_engine_http() as http:
            with pytest.raises(HttpUnreachable):
                await http.get(f"{dead}/model_info", timeout=5)
            with pytest.raises(HttpUnreachable):  # a fresh connection closed without an answer
                await http.get(f"{url}/hangup", timeout=5)
            with pytest.raises(TimeoutError):
                await http.get(f"{url}/silent", timeout=0.2)
            assert await EngineClient(dead, http, 5, 5, 5).health() == "unreachable"
            assert await EngineClient(f"{url}/silent", http, 5, 5, 0.2).health() == "unhealthy"
            for base, error in [
                (dead, EngineError),
                (f"{url}/silent", EngineError),
                (f"{url}/s4", RequestRejected),
                (f"{url}/s5", EngineOverloaded),
                (f"{url}/s6", EngineError),
            ]:
                with pytest.raises(error):
                    await EngineClient(base, http, 0.3, 5, 5).generate([1], {}, "r")
            try:
                await EngineClient(f"{url}/s5", http, 5, 5, 5).generate([1], {}, "r")
            except EngineOverloaded as e:
                assert e.retry_after_s == 2.0

    asyncio.run(main())


def test_malformed_answer_is_a_transport_error() -> None:
    """Guards against a garbled reply crashing the worker instead of failing the request (retried elsewhere)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SPDY/9 nonsense\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server, url = await _serve(handler)
        async with server, Http1Client() as http:
            with pytest.raises(HttpTransportError):
                await http.get(f"{url}/x", timeout=5)
            with pytest.raises(EngineError):
                await EngineClient(url, http, 5, 5, 5).generate([1], {}, "r")

    asyncio.run(main())
