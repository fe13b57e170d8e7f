"""The judge API's HTTP client: keep-alive POSTs of JSON bodies to one base URL, over common/http1.py's lean
HTTP/1.1 client (httpx spent about two thirds of the reward service's CPU per /evaluate request: its connection
pool scans every pooled connection per request, anyio wraps each socket write).

A failure to connect, a reset, or a malformed response raises HttpTransportError; the whole exchange is bounded by
`timeout_s` (TimeoutError). A pooled connection the server closed meanwhile is replaced and the request sent again
once (a judge call changes nothing on the server). No proxy from the environment: a judge on the cluster network
must not go through one.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from common.http1 import Http1Client, HttpTransportError

__all__ = ["Http1Pool", "HttpTransportError"]


class Http1Pool:
    """POSTs to one origin (`base_url`'s scheme, host and port; paths are relative to its path)."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout_s: float, max_idle: int) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"judge base_url {base_url!r}: expected http(s)://host[:port]/path")
        self._base = base_url.rstrip("/") + "/"
        self.timeout_s = timeout_s
        own = {k: v for k, v in headers.items() if k.lower() != "content-type"}  # the client sets it per body
        self._client = Http1Client(max_idle=max_idle, headers={"user-agent": "longtrace-reward", **own})

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Status and body of `POST base_url/path`."""
        r = await self._client.post(self._base + path.lstrip("/"), content=body, timeout=self.timeout_s)
        return r.status_code, r.content

    async def aclose(self) -> None:
        await self._client.aclose()
