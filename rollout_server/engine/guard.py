"""The engine's HTTP guard policy: which paths need the bearer token, and SGLang's error shape.

The guard itself (body-size limit 413, bearer auth 401, both before any body is parsed) is the shared
`common.asgi_guard.Guard`. Here: only the control endpoints need the token; generation stays open
(rollout workers send no token), as do health and info. SGLang's own `--api-key` guards every path, a
superset of these. Errors use SGLang's shape ({object, message, type, param, code}).
"""

from __future__ import annotations

from starlette.types import ASGIApp

from common.asgi_guard import Guard as _Guard
from common.asgi_guard import SafeJSONResponse

__all__ = ["CONTROL_PATHS", "Guard", "SafeJSONResponse", "error_response"]

CONTROL_PATHS = frozenset(
    {
        "/flush_cache",
        "/pause_generation",
        "/continue_generation",
        "/abort_request",
        "/update_weight_version",
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/begin_weight_update",
        "/end_weight_update",
        "/update_weights_from_distributed",
        "/update_weights_from_disk",
    }
)


def error_response(message: str, status: int) -> SafeJSONResponse:
    return SafeJSONResponse(
        {"object": "error", "message": message, "type": str(status), "param": None, "code": status}, status_code=status
    )


class Guard(_Guard):
    """The shared guard with the engine's policy: control paths need the token, SGLang-shaped errors."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        token: str | None,
        max_concurrent_body_bytes: int | None = None,
        retry_after_s: int = 1,
    ) -> None:
        super().__init__(
            app,
            max_body_bytes=max_body_bytes,
            token=token,
            needs_auth=CONTROL_PATHS.__contains__,
            error=error_response,
            unauthorized_message="control endpoints need Authorization: Bearer <token>",
            max_concurrent_body_bytes=max_concurrent_body_bytes,
            retry_after_s=retry_after_s,
        )
