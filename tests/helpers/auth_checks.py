"""Auth checks shared by the services behind the one bearer guard (common/asgi_guard.py): the built-in engine
and the reward API. Each check is a method of `GuardedServer`, the server under test, and asserts one of the guard's
promises on it; the tests (tests/integration/test_auth_engine.py, test_auth_reward.py) add what is the service's own.

In process, requests go through httpx's ASGI transport to a freshly built app (the token is read when the app is
built); `serving` runs the real `longtrace ... serve` process instead.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from starlette.types import ASGIApp

from tests.helpers.reward_server import wait_health

# (method, path, body, headers); the body is JSON, raw bytes or an async stream of bytes (sent chunked).
Call = tuple[str, str, Any, dict[str, str]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class GuardedServer:
    """A service behind the bearer guard, in process; its `check_*` methods are the shared checks."""

    build_app: Callable[[], ASGIApp]
    token: str
    protected: tuple[str, str, Any]
    """(method, path, JSON body) of a request that needs the token and answers 200 with it."""
    error_key: str
    """Where a refusal's reason sits in its JSON: "message" (the engine, SGLang's shape) or "detail" (FastAPI's)."""

    def calls(self, *calls: Call, timeout_s: float = 30) -> list[httpx.Response]:
        """Send `calls` in order to one freshly built app; return the responses."""

        async def main() -> list[httpx.Response]:
            transport = httpx.ASGITransport(self.build_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://guarded") as client:
                out = []
                for method, path, body, headers in calls:
                    raw = isinstance(body, (bytes, AsyncIterator))
                    kw: dict[str, Any] = {"content": body} if raw else {"json": body}
                    out.append(await client.request(method, path, headers=headers, timeout=timeout_s, **kw))
                return out

        return asyncio.run(main())

    def assert_unauthorized(self, *responses: httpx.Response) -> None:
        """Each is a 401 that says why (in the service's error shape) and names the scheme to use."""
        for r in responses:
            assert r.status_code == 401, (r.status_code, r.text)
            assert r.json()[self.error_key] and r.headers["www-authenticate"] == "Bearer", r.text

    def check_bearer_auth(self, method: str, path: str, body: Any) -> list[httpx.Response]:
        """No token, a wrong one, the token under another scheme or in other case: 401. Returns the answers to the
        right token, with the scheme as written and in lower case (RFC 7235: the scheme is case-insensitive), for the
        caller to check against what the endpoint does."""
        token = self.token
        assert token.upper() != token, "the case check needs a token with letters"
        none, wrong, scheme, case, *right = self.calls(
            (method, path, body, {}),
            (method, path, body, bearer(f"{token[:-1]}X")),
            (method, path, body, {"Authorization": f"Basic {token}"}),
            (method, path, body, bearer(token.upper())),  # the token itself is case-sensitive
            (method, path, body, bearer(token)),
            (method, path, body, {"Authorization": f"bearer {token}"}),
        )
        self.assert_unauthorized(none, wrong, scheme, case)
        return right

    def check_auth_precedes_parsing(self, *paths: str) -> None:
        """Without the token, malformed JSON and a body over the server's limit (10,000 bytes: configure a smaller
        `max_body_mb`) sent to each of `paths` get the 401, never a 422 (which would teach the API's validation
        rules to anyone) nor a 413 (which would mean the body was read first)."""
        for path in paths:
            self.assert_unauthorized(
                *self.calls(
                    ("POST", path, b"{not json", {"content-type": "application/json"}),
                    ("POST", path, b"x" * 10_000, {}),
                )
            )

    def check_compare_is_constant_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every credential, wrong or right and whatever its scheme, goes through hmac.compare_digest: `==` would exit
        early and leak how many leading bytes of a guess are right (a timing oracle), and so would skipping the
        compare when the scheme is wrong."""
        compare = hmac.compare_digest
        seen: list[bytes] = []

        def recording(a: bytes, b: bytes) -> bool:
            seen.append(a)
            return compare(a, b)

        monkeypatch.setattr("common.asgi_guard.hmac.compare_digest", recording)
        method, path, body = self.protected
        wrong = f"{self.token[:-1]}X"
        responses = self.calls(
            (method, path, body, bearer(wrong)),
            (method, path, body, bearer(self.token)),
            (method, path, body, {"Authorization": f"Basic {self.token}"}),
        )
        assert [r.status_code for r in responses] == [401, 200, 401]
        assert seen == [wrong.encode(), self.token.encode(), self.token.encode()]  # the credential part


def listening_ips(pid: int) -> list[str]:
    """The addresses process `pid` listens on, one per listening socket."""
    return [c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


@contextmanager
def serving(
    cmd: list[str], env: dict[str, str], log: Path, port: int, token: str, start_timeout_s: float
) -> Iterator[str]:
    """Run `cmd` (a `longtrace ... serve` on `port`, output to `log`) until its /health answers, check that it
    listens on 127.0.0.1 only, and yield its URL. On leaving: SIGTERM, and after a clean exit from the block, check
    that `token` never reached the log."""
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_health(url, proc, log, start_timeout_s)
        assert listening_ips(proc.pid) == ["127.0.0.1"]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert token not in log.read_text()
