"""The HTTP services' guard: bearer auth (401), a body-size limit (413) and a budget of bodies in flight (503), as
one pure ASGI layer.

All checks run before routing or parsing: an unauthenticated caller learns nothing about a protected
endpoint's body (401 comes before any 422), and a body over the limit, whether its Content-Length says
so, lies, or is streamed chunked, never reaches the JSON parser. The body is buffered here and replayed
to the app. Each body is charged to a budget shared by the requests in flight (from its first byte until the
app has answered, since the parsed body lives that long): many large bodies at once cannot exhaust memory, the
one that would overflow the budget gets 503 with Retry-After, and small requests still fit beside the large
ones. Each service says which paths need the token and how its errors look (SGLang's error shape on the engine,
FastAPI's `{"detail": ...}` on the reward service). Used by reward_service/app.py and
rollout_server/engine/guard.py.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNAUTHORIZED = "unauthorized"
BODY_TOO_LARGE = "body_too_large"
BODIES_BUSY = "bodies_busy"


class SafeJSONResponse(JSONResponse):
    """JSONResponse that survives strings the client sent with lone surrogates (from a JSON \\ud800 escape,
    echoed in an error or a stored value): UTF-8 cannot encode them, so such a body is sent \\u-escaped."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def detail_error(message: str, status: int) -> Response:
    """FastAPI's error shape: `{"detail": message}`."""
    return SafeJSONResponse({"detail": message}, status_code=status)


class Guard:
    """Refuse requests to paths where `needs_auth(path)` without `Authorization: Bearer <token>` (401), bodies
    over `max_body_bytes` (413), and bodies that would take the bytes held by requests in flight past
    `max_concurrent_body_bytes` (503 with `Retry-After: retry_after_s`; None: no budget); otherwise replay the
    buffered body to the app. No token: no auth. A body is always admitted when no other request holds any, so
    a budget below `max_body_bytes` serialises large bodies instead of refusing them forever.

    `error(message, status)` builds a refusal's response; `on_refusal(kind)` (UNAUTHORIZED, BODY_TOO_LARGE or
    BODIES_BUSY) lets the service count them. A client that disconnects mid-body gets no answer (nobody to read
    it). The budget's message names `--max_concurrent_body_mb`: a service exposes the budget under that name.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        token: str | None,
        needs_auth: Callable[[str], bool],
        error: Callable[[str, int], Response] = detail_error,
        unauthorized_message: str = "missing or wrong bearer token",
        on_refusal: Callable[[str], None] | None = None,
        max_concurrent_body_bytes: int | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrent_body_bytes = max_concurrent_body_bytes
        self.retry_after_s = retry_after_s
        self.body_bytes_in_flight = 0  # one event loop: a plain counter
        self._token = token.encode() if token else None
        self._needs_auth = needs_auth
        self._error = error
        self._unauthorized_message = unauthorized_message
        self._on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._token is not None and self._needs_auth(scope["path"]) and not self._authorized(scope):
            refusal = self._refuse(UNAUTHORIZED, self._unauthorized_message, 401)
            refusal.headers["WWW-Authenticate"] = "Bearer"
            await refusal(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(declared.decode("latin-1"))(scope, receive, send)
            return
        held = 0  # bytes this request holds of the budget: its declared length up front, more if it lied
        try:
            if declared is not None:
                if not self._hold(held, int(declared)):
                    await self._busy(int(declared))(scope, receive, send)
                    return
                held = int(declared)
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._too_large(f"more than {self.max_body_bytes}")(scope, receive, send)
                    return
                if size > held:
                    if not self._hold(held, size - held):
                        await self._busy(size)(scope, receive, send)
                        return
                    held = size
                chunks.append(chunk)
                more = message.get("more_body", False)
            await self.app(scope, replay_body(b"".join(chunks), receive), send)
        finally:
            self.body_bytes_in_flight -= held

    def _hold(self, held: int, more: int) -> bool:
        """Charge `more` bytes to the budget for a request already holding `held`; False when they do not fit."""
        others = self.body_bytes_in_flight - held
        limit = self.max_concurrent_body_bytes
        if limit is not None and others > 0 and self.body_bytes_in_flight + more > limit:
            return False
        self.body_bytes_in_flight += more
        return True

    def _busy(self, size: int) -> Response:
        assert self.max_concurrent_body_bytes is not None
        message = (
            f"request bodies in flight hold {self.body_bytes_in_flight} bytes; with this one's {size} they would "
            f"exceed {self.max_concurrent_body_bytes} (--max_concurrent_body_mb): retry later"
        )
        refusal = self._refuse(BODIES_BUSY, message, 503)
        refusal.headers["Retry-After"] = str(self.retry_after_s)
        return refusal

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, credential = given.partition(b" ")
        # compare_digest on the credential whatever the scheme (case-insensitive, RFC 7235), so timing does not
        # reveal which part was wrong; `&`, not `and`, for the same reason.
        return hmac.compare_digest(credential.strip(), self._token) & (scheme.lower() == b"bearer")

    def _too_large(self, size: str) -> Response:
        message = f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} (--max_body_mb)"
        return self._refuse(BODY_TOO_LARGE, message, 413)

    def _refuse(self, kind: str, message: str, status: int) -> Response:
        if self._on_refusal is not None:
            self._on_refusal(kind)
        return self._error(message, status)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message, then the real channel (which reports a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
