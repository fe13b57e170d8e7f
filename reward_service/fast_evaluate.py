"""POST /evaluate without the framework: msgspec decodes the body, the scorer scores it, msgspec encodes the answer.

A pure ASGI layer inside the guard (which has already checked the token and buffered the body). A body that
msgspec decodes into the typed structs below and that passes the same checks as the pydantic models
(schemas.py) is scored here; any other body (malformed JSON, a wrong type, a value out of range, a missing
field) is handed on, replayed, to the FastAPI route, so every refusal is the route's 422 with its reasons, word
for word; so is a body whose content-type FastAPI would not read as JSON. The structs are no more lenient than
the models: msgspec decodes strictly (no "1" for a number, no 1 for a bool), and the checks below are the
models' validators. Per request this saves FastAPI's routing,
dependency resolution and pydantic validation of a ~32 KB body, and the JSON encoding of the answer.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import msgspec
from starlette.types import ASGIApp, Receive, Scope, Send

from common.asgi_guard import replay_body
from reward_service.judges.base import JudgeError
from reward_service.rubric import LONGRLVR, parse_chunk_ids
from reward_service.schemas import EvaluateResponse, FastEvaluateRequest
from reward_service.scoring import BadRequest

_DECODER = msgspec.json.Decoder(FastEvaluateRequest)
_ENCODER = msgspec.json.Encoder()
_HEADERS = [(b"content-type", b"application/json")]


def decode(body: bytes) -> FastEvaluateRequest | None:
    """The request, or None where the pydantic route must answer (it refuses the body or might read it
    differently)."""
    try:
        req = _DECODER.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError):  # also invalid UTF-8, deep nesting
        return None
    info = req.extra_reward_info
    if isinstance(req.label, float) and not math.isfinite(req.label):
        return None
    if info.rubric_reward_ratio is not None and not 0 <= info.rubric_reward_ratio <= 1:
        return None
    if req.history is not None:
        if not req.history:
            return None
        if any(m.role == "assistant" and isinstance(m.content, list) for m in req.history):
            return None
    elif req.response is None:
        return None
    if info.dataset_name == LONGRLVR:
        try:
            parse_chunk_ids(info.rubrics)
        except ValueError:
            return None
    return req


def encode_response(resp: EvaluateResponse) -> bytes:
    return _ENCODER.encode(
        {"reward": resp.reward, "outcome_reward": resp.outcome_reward, "rubric_reward": resp.rubric_reward}
    )


class FastEvaluate:
    """Serve POST /evaluate bodies that `decode` accepts with `evaluate(req)`; everything else goes to `app`.

    `errors(exc)` maps the scorer's exceptions (BadRequest, JudgeError, TimeoutError) to the (status, body)
    the app's exception handlers give; anything else propagates, as from the route."""

    def __init__(
        self,
        app: ASGIApp,
        evaluate: Callable[[FastEvaluateRequest], Awaitable[EvaluateResponse]],
        errors: Callable[[Exception], tuple[int, bytes]],
    ) -> None:
        self.app = app
        self.evaluate = evaluate
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != "/evaluate"
            or scope["method"] != "POST"
            or not _json_content(scope["headers"])
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        req = decode(body)
        if req is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        try:
            status, payload = 200, encode_response(await self.evaluate(req))
        except (BadRequest, JudgeError, TimeoutError) as e:
            status, payload = self.errors(e)
        headers = [*_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _json_content(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether FastAPI would read the body as JSON: no content-type, application/json or application/*+json."""
    value = next((v for k, v in headers if k == b"content-type"), None)
    if value is None:
        return True
    media = value.partition(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
