"""A lean async HTTP/1.1 client for internal JSON services: keep-alive GETs and POSTs over asyncio streams.

httpx spent most of the rollout worker's CPU per /generate request (its connection pool scans every pooled
connection per request, probing each socket with getpeername and poll; anyio wraps every socket call), as it did in
the reward service (reward_service/judges/http.py, which this generalises: any origin, GET and POST, a separate
connect timeout, response headers). It does what an engine call needs and no more: one request at a time per
connection, keep-alive per origin, http or https (the default TLS context), responses delimited by
Content-Length, chunked transfer encoding or the connection's end, gzip/deflate bodies, no redirects, no proxy from
the environment, no cookies.

A pooled connection the server closed meanwhile (an idle keep-alive timeout) is replaced and the request sent again
once, on a fresh connection: the server never read it. Errors: `HttpUnreachable` when no connection could be made
or the server closed a fresh one without answering (nothing listens / it is going away), `HttpTransportError` for a
reset or a malformed answer, TimeoutError when `timeout_s` (the whole exchange) or `connect_timeout_s` runs out.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024 * 1024
_RETRYABLE = (ConnectionError, asyncio.IncompleteReadError)  # on a reused connection: the server closed it

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_Origin = tuple[str, str, int]  # scheme, host, port


class HttpTransportError(Exception):
    """The request got no well-formed response: reset, closed early, or a malformed answer."""


class HttpUnreachable(HttpTransportError):
    """No connection could be made, or the server closed a fresh connection without answering."""


@dataclass
class Http1Response:
    """What callers read of a response (the names httpx.Response uses for them)."""

    status_code: int
    headers: dict[str, str]  # lower-cased names; the last of repeated headers
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


@dataclass
class Http1Client:
    """Keep-alive connections to any number of origins; `max_idle` idle connections kept per origin."""

    max_idle: int = 256
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every request (e.g. authorization)."""
    _idle: dict[_Origin, list[_Conn]] = field(default_factory=dict)
    _ssl: ssl.SSLContext | None = None
    _closed: bool = False

    async def get(self, url: str, *, timeout: float, connect_timeout: float | None = None) -> Http1Response:
        return await self.request("GET", url, None, timeout_s=timeout, connect_timeout_s=connect_timeout)

    async def post(
        self,
        url: str,
        *,
        content: bytes,
        timeout: float,
        connect_timeout: float | None = None,
        content_type: str = "application/json",
    ) -> Http1Response:
        return await self.request(
            "POST", url, content, timeout_s=timeout, connect_timeout_s=connect_timeout, content_type=content_type
        )

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        *,
        timeout_s: float,
        connect_timeout_s: float | None = None,
        content_type: str = "application/json",
    ) -> Http1Response:
        if self._closed:
            raise RuntimeError("Http1Client is closed")
        origin, host_header, target = _parse(url)
        lines = [f"{method} {target} HTTP/1.1", f"host: {host_header}", "accept-encoding: gzip, deflate"]
        lines += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in ("host", "content-length")]
        if body is not None:
            lines += [f"content-type: {content_type}", f"content-length: {len(body)}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        message = head + body if body else head
        async with asyncio.timeout(timeout_s):
            while True:
                conn, reused = self._checkout(origin)
                if conn is None:
                    conn = await self._connect(origin, connect_timeout_s)
                reader, writer = conn
                try:
                    writer.write(message)
                    await writer.drain()
                    status, headers, keep, data = await _read_response(reader, head_only=method == "HEAD")
                except (OSError, EOFError, ValueError, zlib.error, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:  # fmt: skip
                    writer.close()
                    if reused and isinstance(e, _RETRYABLE):
                        continue  # the server closed the pooled connection meanwhile: a fresh one
                    if isinstance(e, asyncio.IncompleteReadError) and not e.partial:
                        raise HttpUnreachable(f"{origin[1]}:{origin[2]} closed the connection without answering") from e
                    raise HttpTransportError(f"{type(e).__name__}: {e}") from e
                except BaseException:  # cancelled or timed out mid-exchange: the connection's state is unknown
                    writer.close()
                    raise
                pool = self._idle.setdefault(origin, [])
                if keep and len(pool) < self.max_idle and not self._closed:
                    pool.append(conn)
                else:
                    writer.close()
                return Http1Response(status, headers, data)

    def _checkout(self, origin: _Origin) -> tuple[_Conn | None, bool]:
        pool = self._idle.get(origin)
        while pool:
            reader, writer = pool.pop()
            if reader.at_eof() or writer.is_closing():
                writer.close()
                continue
            return (reader, writer), True
        return None, False

    async def _connect(self, origin: _Origin, timeout_s: float | None) -> _Conn:
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            tls = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None, limit=_MAX_HEAD
                )
        except OSError as e:
            raise HttpUnreachable(f"cannot connect to {host}:{port}: {e}") from e

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for pool in idle.values():
            for _, writer in pool:
                writer.close()

    async def __aenter__(self) -> Http1Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _parse(url: str) -> tuple[_Origin, str, str]:
    """(origin, Host header, request target) of an absolute http(s) URL."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{url!r}: expected http(s)://host[:port]/path")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    port = u.port or (443 if u.scheme == "https" else 80)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return (u.scheme, u.hostname, port), host if u.port is None else f"{host}:{u.port}", target


async def _read_response(reader: asyncio.StreamReader, head_only: bool) -> tuple[int, dict[str, str], bool, bytes]:
    """(status, headers, keep-alive, body) of the next response; 1xx interim responses are skipped."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x response: {lines[0][:100]!r}")
        status = int(rest[:3])
        if status >= 200:
            break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"malformed header line {line[:100]!r}")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    connection = headers.get("connection", "").lower()
    keep = connection != "close" if version == b"HTTP/1.1" else connection == "keep-alive"
    if head_only or status in (204, 304):
        data = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        data = await _read_chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= _MAX_BODY:
            raise ValueError(f"content-length {length} out of range")
        data = await reader.readexactly(length)
    else:
        data, keep = await reader.read(-1), False  # delimited by the connection's end
        if len(data) > _MAX_BODY:
            raise ValueError("body too large")
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "x-gzip"):
        data = zlib.decompress(data, 16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        data = zlib.decompress(data)
    elif encoding != "identity":
        raise ValueError(f"unsupported content-encoding {encoding!r}")
    return status, headers, keep, data


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > _MAX_BODY:
            raise ValueError("chunked body too large")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("malformed chunk")
