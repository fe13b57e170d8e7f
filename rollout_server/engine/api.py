"""SGLang's native HTTP API on the built-in engine (paths, bodies, response shapes and status codes).

Validation errors answer 400 (SGLang overrides FastAPI's 422) with {object, message, type, param,
code}; /generate errors answer 400 with {"error": {"message"}}, and 503 with Retry-After when the waiting queue
is full (`max_queued_requests`); control endpoints answer {success, message} with 200 or 400, and 503 when the
scheduler did not take the command within `control_timeout_s` (withdrawn: nothing changed). The guard (guard.py) in front of the app refuses bodies over
`max_body_mb` (413) and control calls without `Authorization: Bearer <token>` when a token is configured
(401), both before any body is parsed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from rollout_server.engine.config import HEALTH_GENERATION_ENV, health_endpoint_generation
from rollout_server.engine.control import ControlTimeout
from rollout_server.engine.engine import ClientDisconnected, Engine, EngineOverloaded
from rollout_server.engine.guard import Guard, SafeJSONResponse, error_response
from rollout_server.engine.info import model_info as engine_model_info
from rollout_server.engine.info import server_info as engine_server_info
from rollout_server.engine.metrics import install as install_metrics
from rollout_server.engine.protocol import (
    AbortReq,
    BeginWeightUpdateReqInput,
    ContinueGenerationReqInput,
    DestroyWeightsUpdateGroupReqInput,
    EndWeightUpdateReqInput,
    GenerateReqInput,
    InitWeightsUpdateGroupReqInput,
    PauseGenerationReqInput,
    UpdateWeightFromDiskReqInput,
    UpdateWeightsFromDistributedReqInput,
    UpdateWeightVersionReqInput,
)

log = logging.getLogger(__name__)


def _result(success: bool, message: str, **extra: Any) -> JSONResponse:
    return SafeJSONResponse(
        {"success": success, "message": message, **extra}, status_code=200 if success else HTTPStatus.BAD_REQUEST
    )


def _error(message: str, status: int = HTTPStatus.BAD_REQUEST) -> JSONResponse:
    return SafeJSONResponse({"error": {"message": message}}, status_code=status)


def overloaded(engine: Engine, response: JSONResponse) -> JSONResponse:
    """A full waiting queue's 503: retry after `overload_retry_after_s` (here, or on another engine)."""
    response.headers["Retry-After"] = str(engine.config.overload_retry_after_s)
    return response


def sse(obj: Any) -> bytes:
    # ensure_ascii: an echoed rid may hold a lone surrogate, which UTF-8 cannot encode
    return b"data: " + json.dumps(obj, ensure_ascii=True).encode() + b"\n\n"


def build_app(engine: Engine) -> FastAPI:
    """The FastAPI app of one engine (the engine's scheduler is started and stopped by the caller)."""
    from rollout_server.engine.openai_api import add_openai_routes

    app = FastAPI(title="longtrace built-in engine (SGLang native API)", default_response_class=SafeJSONResponse)
    app.state.engine = engine
    token = engine.config.api_key()
    log.info("engine HTTP API: control auth %s", "on" if token else "off")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
        ) or str(exc)
        return SafeJSONResponse(
            {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400},
            status_code=HTTPStatus.BAD_REQUEST,
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own errors (a body it cannot parse, 404, 405) keep a reason, in SGLang's shape
        response = error_response(str(exc.detail), exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(ControlTimeout)
    async def _control_timeout(request: Request, exc: ControlTimeout) -> JSONResponse:
        return SafeJSONResponse({"success": False, "message": str(exc)}, status_code=HTTPStatus.SERVICE_UNAVAILABLE)

    # ---------------- health and info ----------------
    # As SGLang's http_server.py `health_generate`: /health_generate always runs the generation probe (a paused
    # engine fails it after `health_timeout_s`); /health too, unless SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION is
    # off: then a cheap liveness answer, 503 only once the scheduler is gone. Read once: a process's env stays put.
    health_generates = health_endpoint_generation()
    log.info("engine /health: %s (%s)", "generation probe" if health_generates else "liveness", HEALTH_GENERATION_ENV)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        ok = await engine.health_probe()
        return Response(status_code=200 if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    @app.get("/health")
    async def health() -> Response:
        if health_generates:
            return await health_generate()
        return Response(status_code=200 if engine.scheduler.alive else HTTPStatus.SERVICE_UNAVAILABLE)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        return engine_model_info(engine)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        return await engine_server_info(engine)

    @app.get("/get_weight_version")
    @app.get("/weight_version")
    async def get_weight_version() -> dict[str, Any]:
        return {"weight_version": engine.weight_version}

    @app.get("/get_load")
    async def get_load() -> list[dict[str, Any]]:
        load = await engine.load()
        return [
            {
                "dp_rank": 0,
                "num_reqs": load["num_running_reqs"] + load["num_waiting_reqs"],
                "num_waiting_reqs": load["num_waiting_reqs"],
                "num_tokens": load["num_used_tokens"],
            }
        ]

    # ---------------- generation ----------------
    # One route per method: FastAPI names a multi-method route's operations alike (a duplicate operationId).
    @app.put("/generate", response_model=None, operation_id="generate_put")
    @app.post("/generate", response_model=None, operation_id="generate")
    async def generate(obj: GenerateReqInput, request: Request) -> Response | dict[str, Any] | list[dict[str, Any]]:
        try:
            items, single = engine.prepare(obj)
        except ValueError as e:
            return _error(str(e))
        if not engine.scheduler.alive:
            return _error(
                f"engine scheduler is not running: {engine.scheduler.error!r}", HTTPStatus.SERVICE_UNAVAILABLE
            )
        try:
            submitted = engine.submit(items, stream=obj.stream)
        except EngineOverloaded as e:
            return overloaded(engine, _error(str(e), HTTPStatus.SERVICE_UNAVAILABLE))
        if not obj.stream:
            outputs: list[dict[str, Any]] = [{} for _ in items]
            try:
                async for i, out in engine.results(submitted, is_disconnected=request.is_disconnected):
                    outputs[i] = out
            except ClientDisconnected:
                return Response(status_code=499)
            return outputs[0] if single else outputs

        async def stream() -> AsyncIterator[bytes]:
            # aclosing: a client that goes away closes results(), which aborts its unfinished requests.
            async with aclosing(engine.results(submitted)) as outputs:
                async for i, out in outputs:
                    if not single:
                        out["index"] = i
                    yield sse(out)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # ---------------- control ----------------
    @app.get("/flush_cache", operation_id="flush_cache_get")
    @app.post("/flush_cache", operation_id="flush_cache")
    async def flush_cache() -> Response:
        ok, message = await engine.flush_cache()
        return PlainTextResponse(message, status_code=200 if ok else HTTPStatus.BAD_REQUEST)

    @app.post("/pause_generation")
    async def pause_generation(obj: PauseGenerationReqInput | None = Body(None)) -> JSONResponse:
        mode = (obj or PauseGenerationReqInput()).mode
        await engine.pause(mode)
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok", "success": True})

    @app.post("/continue_generation")
    async def continue_generation(obj: ContinueGenerationReqInput | None = Body(None)) -> JSONResponse:
        await engine.resume()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok", "success": True})

    @app.post("/abort_request")
    async def abort_request(obj: AbortReq) -> JSONResponse:
        n = await engine.abort(obj.rid, obj.abort_all)
        return _result(True, f"Aborted {n} request(s).")

    @app.post("/update_weight_version")
    async def update_weight_version(obj: UpdateWeightVersionReqInput) -> JSONResponse:
        await engine.weights.update_weight_version(obj.new_version, obj.abort_all_requests)
        return _result(True, f"Weight version updated to {obj.new_version}", new_version=obj.new_version)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(obj: InitWeightsUpdateGroupReqInput) -> JSONResponse:
        return _result(*await engine.weights.init_group(obj))

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(obj: DestroyWeightsUpdateGroupReqInput | None = Body(None)) -> JSONResponse:
        name = (obj or DestroyWeightsUpdateGroupReqInput()).group_name
        return _result(*await engine.weights.destroy_group(name))

    @app.post("/begin_weight_update")
    async def begin_weight_update(obj: BeginWeightUpdateReqInput | None = Body(None)) -> JSONResponse:
        return _result(*engine.weights.begin_session())

    @app.post("/end_weight_update")
    async def end_weight_update(obj: EndWeightUpdateReqInput | None = Body(None)) -> JSONResponse:
        return _result(*engine.weights.end_session())

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(obj: UpdateWeightsFromDistributedReqInput) -> JSONResponse:
        return _result(*await engine.weights.from_distributed(obj))

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(obj: UpdateWeightFromDiskReqInput) -> JSONResponse:
        ok, message, num_paused = await engine.weights.from_disk(obj)
        return _result(ok, message, num_paused_requests=num_paused)

    add_openai_routes(app, engine)
    install_metrics(app, engine)  # GET /metrics (SGLang's names), before the guard: it stays outermost
    cfg = engine.config
    app.add_middleware(
        Guard,
        max_body_bytes=int(cfg.max_body_mb * 1024 * 1024),
        token=token,
        max_concurrent_body_bytes=int(cfg.max_concurrent_body_mb * 1024 * 1024),
        retry_after_s=cfg.overload_retry_after_s,
    )
    return app
