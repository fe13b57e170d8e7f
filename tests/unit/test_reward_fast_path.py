"""The reward API's fast paths: POST /evaluate decoded by msgspec outside the framework (fast_evaluate.py), the
judge's own HTTP/1.1 client (judges/http.py), and the numpy norm of long answers (rubric.fast_norm)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import reward_service.fast_evaluate as fast_evaluate
from common.text import norm
from reward_service.app import create_app
from reward_service.config import RewardConfig
from reward_service.judges.http import Http1Pool, HttpTransportError
from reward_service.rubric import fast_norm
from reward_service.schemas import EvaluateRequest

_INFO = {"question": "q", "rubrics": ["Paris", "Seine"], "rubric_reward_ratio": 0.3}
GOOD_BODIES: list[dict[str, Any]] = [
    {"label": "Paris", "extra_reward_info": _INFO, "response": "<think>Seine</think>It is Paris."},
    {"label": 7, "extra_reward_info": {**_INFO, "rubric_use_reasoning_content": True}, "response": "<think>x"},
    {"label": 2.5, "extra_reward_info": {"rubric_reward_ratio": 1, "rubrics": ["a"]}, "response": "a"},
    {
        "label": "Paris",
        "extra_reward_info": {**_INFO, "extra": [1, {"x": None}]},
        "history": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "reasoning_content": "Seine", "content": "Paris", "ill_formed_content": 1},
        ],
        "ignored": {"deep": [1, 2]},
    },
    {"label": "x", "extra_reward_info": _INFO, "history": [{"role": "assistant", "content": None}]},
    {
        "label": "x",
        "extra_reward_info": {"question": "q", "dataset_name": "longrlvr", "rubrics": [3, "4"]},
        "response": "<useful_chunks><CHUNK_3></useful_chunks>",
    },
]
# what the pydantic route reads and msgspec does not (lax coercions), or refuses: all must take the route
ROUTED_BODIES: list[Any] = [
    {"label": "x", "extra_reward_info": {**_INFO, "rubric_use_content": "true"}, "response": "Paris"},
    {"label": "x", "extra_reward_info": {**_INFO, "rubric_reward_ratio": "0.5"}, "response": "Paris"},
    {"label": True, "extra_reward_info": _INFO, "response": "Paris"},
    {"label": "x", "extra_reward_info": {**_INFO, "rubric_reward_ratio": 1.5}, "response": "x"},
    {"label": "x", "extra_reward_info": _INFO, "history": []},
    {"label": "x", "extra_reward_info": _INFO},
    {"label": "x", "extra_reward_info": _INFO, "history": [{"role": "assistant", "content": [1]}]},
    {
        "label": "x",
        "extra_reward_info": {"question": "q", "dataset_name": "longrlvr", "rubrics": ["c1"]},
        "response": "x",
    },
    {"label": 1e400, "extra_reward_info": _INFO, "response": "x"},
    [1, 2],
]


def _post_all(bodies: list[bytes], route_only: bool, content_type: str = "application/json") -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        app = create_app(RewardConfig())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return [await c.post("/evaluate", content=b, headers={"content-type": content_type}) for b in bodies]

    if not route_only:
        return asyncio.run(main())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_evaluate, "decode", lambda body: None)
        return asyncio.run(main())


def _counting_decode(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    taken: list[bool] = []
    real = fast_evaluate.decode

    def spy(body: bytes) -> Any:
        req = real(body)
        taken.append(req is not None)
        return req

    monkeypatch.setattr(fast_evaluate, "decode", spy)
    return taken


def test_fast_path_answers_exactly_as_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the msgspec path scoring a body differently from the FastAPI route it replaces (other
    rewards, other JSON), or silently not being taken for ordinary bodies."""
    bodies = [json.dumps(b).encode() for b in GOOD_BODIES]
    routed = _post_all(bodies, route_only=True)
    taken = _counting_decode(monkeypatch)
    fast = asyncio.run(_evaluate_all(bodies))
    assert taken == [True] * len(bodies)
    for body, r, f in zip(GOOD_BODIES, routed, fast, strict=True):
        assert r.status_code == f.status_code == 200, (body, r.text, f.text)
        assert f.json() == r.json() and list(f.json()) == ["reward", "outcome_reward", "rubric_reward"]
        assert f.headers["content-type"] == "application/json"


async def _evaluate_all(bodies: list[bytes]) -> list[httpx.Response]:
    app = create_app(RewardConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        return [await c.post("/evaluate", content=b, headers={"content-type": "application/json"}) for b in bodies]


def test_bodies_msgspec_does_not_take_get_the_routes_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the fast path refusing with its own (reasonless) error, or scoring a body that pydantic
    coerces or refuses: each such body must get exactly the route's status and body, 4xx with their reasons."""
    bodies = [json.dumps(b).encode() for b in ROUTED_BODIES] + [
        b"{not json",
        b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ]
    routed = _post_all(bodies, route_only=True)
    taken = _counting_decode(monkeypatch)
    got = asyncio.run(_evaluate_all(bodies))
    assert not any(taken)
    for body, r, g in zip(bodies, routed, got, strict=True):
        assert (g.status_code, g.content) == (r.status_code, r.content), body[:200]
    assert [g.status_code for g in got[:3]] == [200, 200, 200]  # lax coercions the route accepts
    for g in got[3:]:
        assert 400 <= g.status_code < 500 and g.json()["detail"], g.text


def test_non_json_content_type_takes_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the fast path scoring a form-encoded body that FastAPI refuses (the route does not read
    such a body as JSON): the API's answer must not depend on which path serves it."""
    taken = _counting_decode(monkeypatch)
    (resp,) = _post_all([json.dumps(GOOD_BODIES[0]).encode()], route_only=False, content_type="text/plain")
    assert resp.status_code == 422 and not taken


def test_scorer_errors_on_the_fast_path_are_the_routes() -> None:
    """Guards against a BadRequest raised while scoring a fast-path body (no question with η < 1) becoming a 500
    or losing its reason."""
    body = {"label": "x", "extra_reward_info": {"rubric_reward_ratio": 0.3}, "response": "x"}
    (resp,) = asyncio.run(_evaluate_all([json.dumps(body).encode()]))
    assert resp.status_code == 422 and "question is required" in resp.json()["detail"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
_INFO_KEYS = ["question", "rubrics", "dataset_name", "rubric_reward_ratio", "rubric_use_content", "x"]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["label", "response", "history", "extra"]), _JSON, max_size=4),
    st.dictionaries(st.sampled_from(_INFO_KEYS), _JSON | st.sampled_from(["longrlvr", 0.5, ["1", 2]]), max_size=4),
)
def test_decode_is_never_more_lenient_than_the_models(top: dict[str, Any], info: dict[str, Any]) -> None:
    """Guards against msgspec taking a body the pydantic models refuse (it would be scored instead of getting its
    422), or reading a taken body otherwise than they do."""
    body = json.dumps({**top, "extra_reward_info": info}).encode()
    req = fast_evaluate.decode(body)
    if req is None:
        return
    try:
        model = EvaluateRequest.model_validate_json(body)
    except ValidationError as e:
        raise AssertionError(f"msgspec took a body pydantic refuses: {body!r}: {e}") from None
    assert (req.label, req.response) == (model.label, model.response)
    assert type(req.label) is type(model.label)
    mi, ri = model.extra_reward_info, req.extra_reward_info
    assert (ri.question, ri.rubrics, ri.dataset_name, ri.rubric_reward_ratio, ri.rubric_use_content) == (
        mi.question,
        mi.rubrics,
        mi.dataset_name,
        mi.rubric_reward_ratio,
        mi.rubric_use_content,
    )


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aZ09_ -.,;\n\t\x00\x7f!", min_size=2048, max_size=6000))
def test_fast_norm_equals_norm(text: str) -> None:
    """Guards against the numpy norm of long ASCII answers giving other tokens than norm(): a lost separator run,
    an upper-case letter kept, a leading or trailing space."""
    assert fast_norm(text) == norm(text)
    assert fast_norm(text + "\u00e9" * 3) == norm(text + "\u00e9" * 3)  # non-ASCII: norm's own path


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _with_server(handler: Handler, body: Callable[[str], Awaitable[Any]]) -> Any:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await body(f"http://127.0.0.1:{port}/v1")


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def test_http_client_reads_chunked_gzip_and_survives_a_closed_keepalive() -> None:
    """Guards against the judge's HTTP client misreading a chunked or gzip-encoded completion (a reverse proxy in
    front of the judge sends both), or failing a call because the server closed an idle pooled connection."""
    seen: list[bytes] = []
    payload = gzip.compress(b'{"ok": true}')

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:5], payload[5:])) + b"0\r\n\r\n"
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-encoding: gzip\r\n\r\n" + chunks)
        await writer.drain()
        writer.close()  # keep-alive was implied: the next call finds this connection closed

    async def calls(url: str) -> list[tuple[int, bytes]]:
        pool = Http1Pool(url, {"Authorization": "Bearer k"}, timeout_s=5.0, max_idle=4)
        try:
            out = [await pool.post("chat/completions", b'{"a": 1}')]
            await asyncio.sleep(0.1)
            out.append(await pool.post("chat/completions", b'{"a": 2}'))
            return out
        finally:
            await pool.aclose()

    got = asyncio.run(_with_server(handler, calls))
    assert got == [(200, b'{"ok": true}')] * 2
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and b"Authorization: Bearer k" in seen[0]
    assert seen[1].endswith(b'{"a": 2}')


def test_http_client_errors_are_retryable_kinds() -> None:
    """Guards against a refused connection, a garbled answer or a hung server escaping as some other exception
    (the judge retries only HttpTransportError and TimeoutError) or hanging forever."""

    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def one(url: str) -> Exception:
        pool = Http1Pool(url, {}, timeout_s=0.3, max_idle=1)
        try:
            await pool.post("chat/completions", b"{}")
        except Exception as e:
            return e
        finally:
            await pool.aclose()
        raise AssertionError("no error")

    assert isinstance(asyncio.run(_with_server(garbled, one)), HttpTransportError)
    assert isinstance(asyncio.run(_with_server(hung, one)), TimeoutError)
    from common.net import free_port

    assert isinstance(asyncio.run(one(f"http://127.0.0.1:{free_port()}/v1")), HttpTransportError)
