"""Async client of one engine's SGLang native HTTP API: /generate with logprobs, /health, /model_info.

Every answer's SGLang `weight_version` string becomes a policy version here, through weights/version.py (one
parser, one meaning of "default": `initial_policy_version`), and so does each span of `meta_info.weight_versions`
(SGLang 0.5.23: an answer paused in_place/retract across a weight update names each span's version). A string that
names no policy version is the engine's fault (EngineError: the sample moves to another engine), never a crash of
the worker. The version served now is read from /model_info: SGLang 0.5.23 deprecates /get_model_info and has no
/get_weight_version (docs/deploy.md).

Errors are typed by what the caller should do: `EngineError` (connection, timeout, 5xx, a malformed reply)
means try another engine; `RequestRejected` (a 4xx) means the request itself is wrong and retrying is futile.

The transport is common/http1.py's lean keep-alive client (`make_engine_http`, what the routers use by default):
httpx cost the worker most of its CPU per request (its pool probes every pooled socket per request). An
httpx.AsyncClient passed in (eval's, with its auth header; tests' mock transports) is used through the same calls.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import msgspec

from broker.schemas import FinishReason, WeightSegment
from common.http1 import Http1Client, HttpTransportError, HttpUnreachable
from weights.engine_client import LIVENESS_PATHS
from weights.version import SGLANG_DEFAULT, WeightVersionError, parse_weight_version

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed to answer properly (transient from the request's point of view)."""


class EngineOverloaded(EngineError):
    """503 with Retry-After: the engine's waiting queue is full (SGLang's `--max-queued-requests`, the built-in
    engine's `max_queued_requests`). The engine is healthy: back off, do not count it toward the breaker."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRejected(ValueError):
    """The engine refused the request with a 4xx: the request is invalid, not the engine."""


class _FinishReason(msgspec.Struct):
    type: str
    message: str = ""
    status_code: int | None = None


class _WeightVersionSpan(msgspec.Struct):
    version: str
    start: int
    end: int


class _MetaInfo(msgspec.Struct):
    finish_reason: _FinishReason | None = None
    # [logprob, token id, token text or null] per generated token
    output_token_logprobs: list[tuple[float | None, int, str | None]] = []
    weight_version: str = SGLANG_DEFAULT
    weight_versions: list[_WeightVersionSpan] | None = None  # absent before SGLang 0.5.23
    routed_experts: str | None = None  # with return_routed_experts: base64 of int32 [prompt + output - 1, layers, k]
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine took from its cache (prefix sharing) instead of computing


class _GenerateResponse(msgspec.Struct):
    meta_info: _MetaInfo
    text: str = ""
    output_ids: list[int] | None = None


class _WeightVersion(msgspec.Struct):
    weight_version: str


_decode_generate = msgspec.json.Decoder(_GenerateResponse).decode
_decode_version = msgspec.json.Decoder(_WeightVersion).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class GenerateResult:
    """One /generate answer: the new tokens, their engine logprobs and why generation stopped."""

    output_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    policy_version: int  # of the weights the last token came from (meta_info.weight_version, parsed)
    segments: tuple[WeightSegment, ...]
    """The policy version of this answer's tokens: one segment per run of a version, `start` counted from this
    answer's first token, each covering at least one token (none when the answer has no token)."""
    abort_message: str = ""
    abort_status: int | None = None  # set when the engine aborted for a reason of its own (4xx/5xx code)
    routed_experts: bytes | None = None
    """With return_routed_experts: the engine's experts of every token it ran on, raw little-endian int32 (SGLang's
    meta_info.routed_experts, base64-decoded): [prompt + output tokens - 1, moe layers, topk], flattened."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Of the prompt_tokens, how many the engine did not prefill (its prefix cache: meta_info.cached_tokens)."""


def engine_policy_version(raw: str, initial_policy_version: int) -> int:
    """The policy version an engine's weight_version names; EngineError when it names none."""
    try:
        return parse_weight_version(raw, initial_policy_version)
    except WeightVersionError as e:
        raise EngineError(f"engine reports {e}") from None


def parse_generate(body: bytes, initial_policy_version: int) -> GenerateResult:
    """Decode a /generate reply; raise EngineError when it is not what SGLang's native API returns.
    `initial_policy_version`: what the engine's "default" weight_version means (weights/version.py)."""
    try:
        resp = _decode_generate(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise EngineError(f"malformed /generate reply: {e}") from e
    finish = resp.meta_info.finish_reason
    if finish is None or finish.type not in ("stop", "length", "abort"):
        raise EngineError(f"/generate reply has finish_reason {finish!r}")
    triples = resp.meta_info.output_token_logprobs
    ids = [t[1] for t in triples]
    logprobs = [t[0] for t in triples]
    if any(lp is None for lp in logprobs):
        raise EngineError("/generate reply has a null logprob for a generated token")
    if resp.output_ids is not None and resp.output_ids != ids:
        raise EngineError(
            f"/generate reply: output_ids ({len(resp.output_ids)}) disagree with output_token_logprobs ({len(ids)})"
        )
    policy_version = engine_policy_version(resp.meta_info.weight_version, initial_policy_version)
    routed: bytes | None = None
    if resp.meta_info.routed_experts is not None:
        try:
            routed = base64.b64decode(resp.meta_info.routed_experts, validate=True)
        except binascii.Error as e:
            raise EngineError(f"/generate reply: meta_info.routed_experts is not base64: {e}") from e
    return GenerateResult(
        output_ids=ids,
        logprobs=logprobs,  # type: ignore[arg-type]  # None excluded above
        text=resp.text,
        finish_reason=finish.type,  # type: ignore[arg-type]  # checked above
        policy_version=policy_version,
        segments=_segments(resp.meta_info.weight_versions, len(ids), policy_version, initial_policy_version),
        abort_message=finish.message if finish.type == "abort" else "",
        abort_status=finish.status_code if finish.type == "abort" else None,
        routed_experts=routed,
        prompt_tokens=resp.meta_info.prompt_tokens,
        cached_tokens=resp.meta_info.cached_tokens,
    )


def _segments(
    spans: list[_WeightVersionSpan] | None, num_tokens: int, policy_version: int, initial_policy_version: int
) -> tuple[WeightSegment, ...]:
    """The answer's segments from SGLang's spans, which tile its tokens: [start, end) in order from 0 to the last
    token; adjacent spans of one policy version ("default" and "0") merge. Without spans (before 0.5.23) every token
    is `policy_version`'s. Spans that do not tile the tokens are a malformed reply (EngineError)."""
    if spans is None:
        return (WeightSegment(0, policy_version),) if num_tokens else ()
    # 0, start, end, start, end, ..., num_tokens: each span starts where the one before ended, none runs backwards
    edges = [0, *(e for s in spans for e in (s.start, s.end)), num_tokens]
    if not spans or any(a > b for a, b in itertools.pairwise(edges)) or edges[::2] != edges[1::2]:
        shown = [(s.version, s.start, s.end) for s in spans[:8]]
        raise EngineError(f"/generate reply: meta_info.weight_versions {shown} do not tile its {num_tokens} tokens")
    segments: list[WeightSegment] = []
    for span in spans:
        version = engine_policy_version(span.version, initial_policy_version)
        if span.end > span.start and (not segments or segments[-1].policy_version != version):
            segments.append(WeightSegment(span.start, version))
    return tuple(segments)


EngineHttp = Http1Client | httpx.AsyncClient
"""A connection pool EngineClient can use: the lean one (`make_engine_http`) or an httpx client."""


class _Response(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...


class _Httpx:
    """An httpx.AsyncClient behind Http1Client's calls and errors."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def get(self, url: str, *, timeout: float, connect_timeout: float | None = None) -> _Response:
        return await self._send(url, "GET", None, httpx.Timeout(timeout, connect=connect_timeout))

    async def post(
        self, url: str, *, content: bytes, timeout: float, connect_timeout: float | None = None
    ) -> _Response:
        return await self._send(url, "POST", content, httpx.Timeout(timeout, connect=connect_timeout))

    async def _send(self, url: str, method: str, content: bytes | None, timeout: httpx.Timeout) -> _Response:
        # build_request + send, URL first: the contract scan (tests/unit/test_sglang_contract.py) takes calls of
        # .get/.post, or of f("POST", url, ...), with a URL parameter for wrappers; EngineClient's own calls below
        # are the engine requests, read with their routes and bodies.
        headers = {"content-type": "application/json"} if content is not None else None
        request = self._http.build_request(method, url, content=content, headers=headers, timeout=timeout)
        try:
            return await self._http.send(request)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
            raise HttpUnreachable(f"{type(e).__name__}: {e}") from e
        except httpx.TimeoutException as e:
            raise TimeoutError(f"{type(e).__name__}: {e}") from e
        except httpx.HTTPError as e:
            raise HttpTransportError(f"{type(e).__name__}: {e}") from e


class EngineClient:
    """Talks to one engine (or one sglang-router) over a shared connection pool."""

    def __init__(
        self,
        url: str,
        http: EngineHttp,
        request_timeout_s: float,
        connect_timeout_s: float,
        health_timeout_s: float,
        initial_policy_version: int = 0,
    ) -> None:
        self.url = url.rstrip("/")
        self._http: Http1Client | _Httpx = _Httpx(http) if isinstance(http, httpx.AsyncClient) else http
        self._gen_timeout = request_timeout_s  # the whole exchange
        self._connect_timeout = connect_timeout_s
        self._health_timeout = health_timeout_s
        self._health_connect_timeout = min(connect_timeout_s, health_timeout_s)
        self._initial_policy_version = initial_policy_version

    async def generate(
        self, input_ids: list[int], sampling_params: dict[str, Any], rid: str, return_routed_experts: bool = False
    ) -> GenerateResult:
        payload: dict[str, Any] = {
            "input_ids": input_ids,
            "sampling_params": sampling_params,
            "return_logprob": True,
            "rid": rid,
        }
        if return_routed_experts:
            payload["return_routed_experts"] = True
        try:
            resp = await self._http.post(
                f"{self.url}/generate",
                content=_encode(payload),
                timeout=self._gen_timeout,
                connect_timeout=self._connect_timeout,
            )
        except (HttpTransportError, TimeoutError) as e:
            raise EngineError(f"{self.url}/generate: {type(e).__name__}: {e}") from e
        if 400 <= resp.status_code < 500:
            raise RequestRejected(f"{self.url}/generate rejected the request ({resp.status_code}): {resp.text[:500]}")
        if resp.status_code == 503 and "retry-after" in resp.headers:
            raise EngineOverloaded(
                f"{self.url}/generate is overloaded (503): {resp.text[:200]}",
                _retry_after_s(resp.headers["retry-after"]),
            )
        if resp.status_code != 200:
            raise EngineError(f"{self.url}/generate answered {resp.status_code}: {resp.text[:500]}")
        return parse_generate(resp.content, self._initial_policy_version)

    async def healthy(self) -> bool:
        """True when the engine is alive (`health` is "ok"): paused for a weight push counts as alive."""
        return await self.health() == "ok"

    async def health(self) -> Literal["ok", "unhealthy", "unreachable"]:
        """Liveness, paused or not, on the first of LIVENESS_PATHS that exists (/model_info; why not /health:
        weights/engine_client.py). `ok`: it answered 200 within the health timeout. `unhealthy`: it answered
        otherwise or timed out. `unreachable`: the connection failed (no process listens: it is gone)."""
        path = LIVENESS_PATHS[0]
        try:
            for path in LIVENESS_PATHS:
                resp = await self._get(f"{self.url}{path}")
                if resp.status_code != 404:
                    break
        except HttpUnreachable as e:
            log.debug("%s%s: %r", self.url, path, e)
            return "unreachable"
        except (HttpTransportError, TimeoutError) as e:
            log.debug("%s%s: %r", self.url, path, e)
            return "unhealthy"
        return "ok" if resp.status_code == 200 else "unhealthy"

    async def policy_version(self) -> int:
        """The policy version the engine serves now (its weight_version on /model_info; /get_model_info, deprecated
        in SGLang 0.5.23, only for an older build that has no /model_info)."""
        path = "/model_info"
        try:
            resp = await self._get(f"{self.url}{path}")
            if resp.status_code == 404:
                path = "/get_model_info"
                resp = await self._get(f"{self.url}{path}")
        except (HttpTransportError, TimeoutError) as e:
            raise EngineError(f"{self.url}{path}: {type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise EngineError(f"{self.url}{path} answered {resp.status_code}")
        try:
            raw = _decode_version(resp.content).weight_version
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise EngineError(f"malformed {path} reply: {e}") from e
        return engine_policy_version(raw, self._initial_policy_version)

    async def _get(self, url: str) -> _Response:
        return await self._http.get(url, timeout=self._health_timeout, connect_timeout=self._health_connect_timeout)


def _retry_after_s(value: str) -> float:
    """Seconds of a Retry-After header (delta-seconds; an HTTP date or garbage counts as 1 s), capped at 60 s."""
    try:
        seconds = float(value)
    except ValueError:
        return 1.0
    return min(max(seconds, 0.0), 60.0) if seconds == seconds else 1.0


def make_engine_http(max_keepalive: int = 256) -> Http1Client:
    """One lean pool for all engines (what the routers use unless given a client); concurrency is bounded by the
    router, not by the pool; `max_keepalive` idle connections are kept per engine. No proxy from the env."""
    return Http1Client(max_idle=max_keepalive)


def make_http_client(max_keepalive: int = 256) -> httpx.AsyncClient:
    """An httpx pool for all engines, for callers that also use it directly (eval adds its auth header)."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=max_keepalive),
        timeout=httpx.Timeout(30.0),
        trust_env=False,  # engines are internal addresses: never route them through a proxy from the env
    )
