"""A small HTTP/1.1 client for the judge API: keep-alive POSTs of JSON bodies over asyncio streams.

httpx spent about two thirds of the reward service's CPU per /evaluate request (its connection pool scans every
pooled connection per request, anyio wraps each socket write); this client does what the judge needs and no more:
one POST at a time per connection, keep-alive, http or https (the default TLS context), responses delimited by
Content-Length, chunked transfer encoding or the connection's end, gzip/deflate bodies, no redirects, no proxy
from the environment. A pooled connection the server has closed meanwhile is replaced (the request is sent
again once: a judge call changes nothing on the server). A failure to connect, a reset, or a malformed response
raises HttpTransportError; the whole exchange is bounded by `timeout_s` (TimeoutError).
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
_MAX_BODY = 256 * 1024 * 1024


class HttpTransportError(Exception):
    """The request got no well-formed response: refused, reset, closed early, or a malformed answer."""


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Http1Pool:
    """POSTs to one origin (`base_url`'s scheme, host and port; paths are relative to its path)."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout_s: float, max_idle: int) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"judge base_url {base_url!r}: expected http(s)://host[:port]/path")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/") + "/"
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        host = self.host if url.port is None else f"{self.host}:{url.port}"
        if ":" in self.host:
            host = f"[{self.host}]" if url.port is None else f"[{self.host}]:{url.port}"
        lines = [f"host: {host}", "accept-encoding: gzip, deflate", "user-agent: longtrace-reward"]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
        self._headers = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._idle: list[_Conn] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Status and body of `POST base_path + path`."""
        head = b"POST %s HTTP/1.1\r\n%scontent-length: %d\r\n\r\n" % (
            (self.base_path + path).encode("latin-1"),
            self._headers,
            len(body),
        )
        async with asyncio.timeout(self.timeout_s):
            while True:
                conn, reused = self._checkout()
                if conn is None:
                    conn = await self._connect()
                reader, writer = conn
                try:
                    writer.write(head + body)
                    await writer.drain()
                    status, keep, data = await _read_response(reader)
                except (
                    OSError,
                    EOFError,
                    ValueError,
                    zlib.error,
                    asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError,
                ) as e:
                    writer.close()
                    if reused and isinstance(e, (ConnectionError, asyncio.IncompleteReadError)):
                        continue  # the server closed the pooled connection meanwhile: a fresh one
                    raise HttpTransportError(f"{type(e).__name__}: {e}") from e
                except BaseException:  # cancelled or timed out mid-exchange: the connection's state is unknown
                    writer.close()
                    raise
                if keep and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                else:
                    writer.close()
                return status, data

    def _checkout(self) -> tuple[_Conn | None, bool]:
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing():
                writer.close()
                continue
            return (reader, writer), True
        return None, False

    async def _connect(self) -> _Conn:
        try:
            return await asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None, limit=_MAX_HEAD
            )
        except OSError as e:
            raise HttpTransportError(f"cannot connect to {self.host}:{self.port}: {e}") from e

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, keep-alive, body) of the next response; 1xx interim responses are skipped."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x response: {lines[0][:100]!r}")
        status = int(rest[:3])
        if status >= 200:
            break
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"malformed header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    connection = headers.get(b"connection", b"").lower()
    keep = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
    if status in (204, 304):
        data = b""
    elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        data = await _read_chunked(reader)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if not 0 <= length <= _MAX_BODY:
            raise ValueError(f"content-length {length} out of range")
        data = await reader.readexactly(length)
    else:
        data, keep = await reader.read(_MAX_BODY), False
    encoding = headers.get(b"content-encoding", b"identity").lower()
    if encoding in (b"gzip", b"x-gzip"):
        data = zlib.decompress(data, 16 + zlib.MAX_WBITS)
    elif encoding == b"deflate":
        data = zlib.decompress(data)
    elif encoding != b"identity":
        raise ValueError(f"unsupported content-encoding {encoding!r}")
    return status, keep, data


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
