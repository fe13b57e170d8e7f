"""The reward service's HTTP API (FastAPI): `create_app(config, judge=None)`.

Routes: POST /evaluate (drop-in for the LongTraceRL reward server), POST /v1/score (a batch of samples),
POST /v1/score_group (one group: normalisation + combination rule), GET /health, GET /metrics, and the
OpenAPI docs at /docs. The shared pure-ASGI guard (common.asgi_guard) in front of the app checks the bearer
token (401) and enforces the body-size limit (413) and the budget of bodies in flight (503) before anything is
parsed; an outer layer records request metrics. POST /evaluate bodies that msgspec decodes strictly are scored by
a layer inside the guard without the framework (fast_evaluate.py); the others reach the route. Malformed bodies
get 422 with the reason; a judge that fails gets 502 with its error, never a reward of 0; scoring past
`request_timeout_s` gets 504 (the deadline also stops the CPU work, which for a long text runs off the event loop,
so /health keeps answering).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.asgi_guard import Guard, SafeJSONResponse
from reward_service.config import RewardConfig
from reward_service.deadline import scoring_deadline
from reward_service.fast_evaluate import FastEvaluate
from reward_service.judges import Judge, JudgeError, build_judge
from reward_service.metrics import ERRORS, REGISTRY, REQUEST_SECONDS, REQUESTS
from reward_service.schemas import (
    EvaluateRequest,
    EvaluateResponse,
    Health,
    ScoreGroupRequest,
    ScoreGroupResponse,
    ScoreRequest,
    ScoreResponse,
)
from reward_service.scoring import BadRequest, Scorer

log = logging.getLogger(__name__)
T = TypeVar("T")

CONFIG_ENV = "LONGTRACE_REWARD_CONFIG_JSON"
"""`longtrace reward serve` with several processes passes the RewardConfig (JSON) to its workers in this variable."""
ROUTES = ("/evaluate", "/v1/score", "/v1/score_group", "/health", "/metrics", "/docs", "/openapi.json")
OPEN_ROUTES = frozenset({"/health", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"})


class _RequestMetrics:
    """Request count and latency by route and status, as a pure ASGI layer around the guard (so refusals count).

    A request that ends without a response (the client went away mid-body) is recorded as 499.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in ROUTES else "other"
        start = time.perf_counter()
        status = 0

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except BaseException:
            status = status or 500
            raise
        finally:
            REQUESTS.labels(route, str(status or 499)).inc()
            REQUEST_SECONDS.labels(route).observe(time.perf_counter() - start)


def create_app(config: RewardConfig, judge: Judge | None = None) -> FastAPI:
    """The ASGI app. A judge passed in is left open on shutdown; one built here from `config.judge` is closed."""
    owned = judge is None
    the_judge = build_judge(config.judge) if judge is None else judge
    scorer = Scorer(the_judge, config)
    token = config.auth_token()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("reward service up: judge=%s auth=%s", the_judge.kind, "on" if token else "off")
        yield
        if owned:
            await the_judge.aclose()

    app = FastAPI(
        title="LongTrace reward service",
        summary="Outcome (LLM or rule judge) + entity rubric rewards of LongTraceRL, drop-in for its /evaluate.",
        version="1",
        lifespan=lifespan,
    )

    async def bounded(aw: Awaitable[T]) -> T:
        async with scoring_deadline(config.request_timeout_s):
            return await aw

    def refusal(exc: Exception) -> tuple[int, str]:
        """Status and detail of a scorer's failure, counted (the route's handlers and the fast path)."""
        if isinstance(exc, BadRequest):
            ERRORS.labels("bad_request").inc()
            return 422, str(exc)
        if isinstance(exc, JudgeError):
            ERRORS.labels("judge").inc()
            log.warning("judge failed: %s", exc)
            return 502, f"judge failed: {exc}"
        ERRORS.labels("timeout").inc()
        return 504, f"scoring took longer than {config.request_timeout_s:g} s (--request_timeout_s)"

    async def _refused(_: Request, exc: Exception) -> JSONResponse:
        status, detail = refusal(exc)
        return SafeJSONResponse({"detail": detail}, status_code=status)

    def fast_refused(exc: Exception) -> tuple[int, bytes]:
        status, detail = refusal(exc)
        return status, bytes(SafeJSONResponse({"detail": detail}).body)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        ERRORS.labels("bad_request").inc()
        # no "input" echo: it can be a 128K-token history
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return SafeJSONResponse({"detail": errors}, status_code=422)

    for exc_class in (BadRequest, JudgeError, TimeoutError):
        app.add_exception_handler(exc_class, _refused)

    @app.post("/evaluate", response_model=EvaluateResponse, tags=["reward"])
    async def evaluate(req: EvaluateRequest) -> EvaluateResponse:
        """One sample, LongTraceRL reward-server contract: `{label, extra_reward_info, history | response}` ->
        `{reward, outcome_reward, rubric_reward}`."""
        return await bounded(scorer.evaluate(req))

    @app.post("/v1/score", response_model=ScoreResponse, tags=["reward"])
    async def score(req: ScoreRequest) -> ScoreResponse:
        """Independent samples (each an /evaluate body), scored concurrently; one failed judge fails the request."""
        return await bounded(scorer.score(req))

    @app.post("/v1/score_group", response_model=ScoreGroupResponse, tags=["reward"])
    async def score_group(req: ScoreGroupRequest) -> ScoreGroupResponse:
        """One group: per-sample parts, rubric max-normalisation over the group, then the combination rule."""
        return await bounded(scorer.score_group_request(req))

    @app.get("/health", response_model=Health, tags=["ops"])
    async def health() -> Health:
        return Health(judge=the_judge.kind)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # innermost: the bodies it decodes skip the route, the others reach it (after the guard, within the metrics)
    app.add_middleware(FastEvaluate, evaluate=lambda req: bounded(scorer.evaluate(req)), errors=fast_refused)
    app.add_middleware(
        Guard,
        max_body_bytes=int(config.max_body_mb * 1024 * 1024),
        max_concurrent_body_bytes=int(config.max_concurrent_body_mb * 1024 * 1024),
        token=token,
        needs_auth=lambda path: path not in OPEN_ROUTES,
        on_refusal=lambda kind: ERRORS.labels(kind).inc(),
    )
    app.add_middleware(_RequestMetrics)  # added last: the outermost layer
    return app


def app_from_env() -> FastAPI:
    """The app of one worker process of `reward serve --num_processes N` (uvicorn's factory)."""
    import os

    return create_app(RewardConfig.model_validate_json(os.environ[CONFIG_ENV]))
