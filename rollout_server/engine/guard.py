"""The engine's HTTP guard: body-size limit (413) and bearer auth of the control endpoints (401).

A pure ASGI layer in front of the app, so both checks run before any body is parsed: an
unauthenticated caller learns nothing about the control endpoints' bodies, and an oversized or lying
Content-Length never reaches the JSON parser. Errors use SGLang's error shape
({object, message, type, param, code}). Generation stays open (rollout workers send no token),
as do health and info; SGLang's own `--api-key` guards every path, a superset of these.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

CONTROL_PATHS = frozenset(
    {
        "/flush_cache",
        "/pause_generation",
        "/continue_generation",
        "/abort_request",
        "/update_weight_version",
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/update_weights_from_distributed",
        "/update_weights_from_disk",
    }
)


class SafeJSONResponse(JSONResponse):
    """JSONResponse that survives strings the client sent with lone surrogates (a rid, a weight version, a
    model name echoed back): such strings cannot be UTF-8 encoded, so they are sent \\u-escaped instead."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(message: str, status: int) -> SafeJSONResponse:
    return SafeJSONResponse(
        {"object": "error", "message": message, "type": str(status), "param": None, "code": status}, status_code=status
    )


class Guard:
    """Refuse unauthenticated control calls (401) and bodies over `max_body_bytes` (413); replay the
    buffered body to the app otherwise."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, token: str | None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._token is not None and scope["path"] in CONTROL_PATHS and not self._authorized(scope):
            refusal = error_response("control endpoints need Authorization: Bearer <token>", 401)
            refusal.headers["WWW-Authenticate"] = "Bearer"
            await refusal(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(declared.decode("latin-1"))(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away mid-body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(f"more than {self.max_body_bytes}")(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, credential = given.partition(b" ")
        # compare_digest on the credential whatever the scheme, so timing does not reveal which part was wrong
        return hmac.compare_digest(credential.strip(), self._token) & (scheme.lower() == b"bearer")

    def _too_large(self, size: str) -> SafeJSONResponse:
        return error_response(
            f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} (--max_body_mb)", 413
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message, then the real channel (which reports a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
