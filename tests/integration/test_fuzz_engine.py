"""Hostile input against the built-in engine's HTTP API (SGLang native + OpenAI): schemathesis from its OpenAPI
schema with the control endpoints authenticated, and a corpus of hand-made bodies that once crashed it (500s,
and a top_k that killed the scheduler thread, i.e. the whole engine, with one unauthenticated request)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from experiments.fuzz import ENGINE_FOLLOW_UPS, engine_config, fuzz_app, reason_of
from rollout_server.engine.api import build_app
from rollout_server.engine.engine import Engine
from rollout_server.models import init_tiny_model

TOKEN = "engine-fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 6  # CI-sized: 27 operations x 2 modes; `longtrace bench fuzz` runs a larger budget


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = tmp_path_factory.mktemp("fuzz-engine")
    (root / "token").write_text(TOKEN + "\n")
    eng = Engine(engine_config(init_tiny_model(root / "model"), api_key_file=str(root / "token")))
    eng.start()
    yield eng
    eng.shutdown()


def _post(engine: Engine, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(build_app(engine), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine", timeout=60) as client:
            return await client.post(
                path, content=body, headers={"content-type": "application/json", **AUTH, **(headers or {})}
            )

    return asyncio.run(main())


def test_schemathesis_in_process_no_5xx_and_every_4xx_has_a_reason(engine: Engine) -> None:
    """Guards against any generated request (valid or invalid by the schema, control endpoints included) crashing
    the engine (5xx, a dead scheduler) or being refused without a reason, and against a schema too loose to
    produce requests that generate."""
    report = fuzz_app(build_app(engine), headers=AUTH, follow_ups=ENGINE_FOLLOW_UPS, max_examples=MAX_EXAMPLES)
    assert report.ok, "\n".join(report.failures)
    assert report.endpoints == 27
    assert report.by_status[401] == 0, "the token was refused"
    assert report.by_status[200] >= 40 and report.by_status[400] >= 40, report.as_dict()
    assert engine.scheduler.alive and not engine.scheduler.paused


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


_GEN = '{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, '
HOSTILE: list[tuple[str, str, bytes, int, str]] = [
    # name, path, raw body, expected status, what the reason (or body) must contain
    ("text with a lone surrogate", "/generate", b'{"text": "a\\ud800", "sampling_params": {"max_new_tokens": 2}}', 400,
     "not valid Unicode"),
    ("chat content with a lone surrogate", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}', 400, "not valid Unicode"),
    ("completion prompt with a lone surrogate", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', 400,
     "not valid Unicode"),
    ("seed beyond 64 bits", "/generate", (_GEN + '"sampling_seed": 18446744073709551616}}').encode(), 400,
     "sampling_seed"),
    ("top_k beyond int64", "/generate", (_GEN + '"top_k": 1180591620717411303424, "temperature": 1.0}}').encode(),
     200, "output_ids"),
    ("n of a billion", "/generate", (_GEN + '"n": 1000000000}}').encode(), 400, "--max_request_items"),
    ("reserved chat_template_kwargs", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": true}}', 400,
     "may not set tokenize"),
    ("template variable named messages", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": 3}}', 400, "messages"),
    ("content part with a number as text", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400, "text"),
    ("rid with a lone surrogate", "/generate", (_GEN + '"temperature": 0}, "rid": "r\\ud800"}').encode(), 200,
     "r\\ud800"),
    ("model name with a lone surrogate", "/v1/completions", b'{"prompt": [1, 2], "max_tokens": 1, "model": "\\ud800"}',
     200, "\\ud800"),
    ("deep nesting", "/generate", b"[" * 100_000 + b"]" * 100_000, 400, "body"),
    ("invalid UTF-8", "/generate", b'{"text": "\xff\xfe"}', 400, "body"),
    ("stop as a number", "/generate", (_GEN + '"stop": 1.5}}').encode(), 400, "sampling_params.stop"),
    ("stop_token_ids as a bool", "/generate", (_GEN + '"stop_token_ids": true}}').encode(), 400,
     "sampling_params.stop_token_ids"),
    ("empty body", "/generate", b"", 400, "body"),
    ("port out of range", "/init_weights_update_group",
     b'{"master_address": "127.0.0.1", "master_port": 70000, "rank_offset": 1, "world_size": 2, "backend": "gloo"}',
     400, "master_port"),
    ("empty master address", "/init_weights_update_group",
     b'{"master_address": "", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "gloo"}', 400,
     "is not a host:port"),
    ("master address with a path", "/init_weights_update_group",
     b'{"master_address": "a/b", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "gloo"}', 400,
     "host:port"),
    ("world size beyond 64 bits", "/init_weights_update_group",
     b'{"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 18446744073709551616, '
     b'"backend": "gloo"}', 400, "world_size"),
    ("negative dimension", "/update_weights_from_distributed", b'{"names": ["x"], "dtypes": ["float32"], '
     b'"shapes": [[-1]]}', 400, "negative dimension"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "body", "status", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_a_reasoned_4xx_or_an_answer(
    engine: Engine, name: str, path: str, body: bytes, status: int, needle: str
) -> None:
    """Guards against inputs a schema-driven fuzzer rarely or never generates (lone surrogates, integers beyond
    64 bits, template kwargs that collide with the renderer's, deep nesting) answering 500 or killing the
    scheduler thread; strings echoed back (rid, model) must come back escaped, not crash the response."""
    resp = _post(engine, path, body)
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert needle in reason_of(resp.content), resp.text
    else:
        assert needle in resp.text
        json.loads(resp.content)  # valid JSON although the echoed string cannot be UTF-8 encoded
    assert engine.scheduler.alive, f"the scheduler died: {engine.scheduler.error!r}"


def test_streamed_rid_with_a_lone_surrogate_streams(engine: Engine) -> None:
    """Guards against a streamed /generate dying mid-response (a truncated SSE stream) on an echoed rid."""
    resp = _post(engine, "/generate", (_GEN + '"temperature": 0}, "rid": "\\udfff", "stream": true}').encode())
    assert resp.status_code == 200
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["meta_info"]["id"] == "\udfff"


def test_weight_version_with_a_lone_surrogate_does_not_break_later_answers(engine: Engine) -> None:
    """Guards against a stored string (the weight version, echoed in every /generate answer) that UTF-8 cannot
    encode turning every later request into a 500."""
    try:
        assert _post(engine, "/update_weight_version", b'{"new_version": "v\\ud800"}').status_code == 200
        gen = _post(engine, "/generate", (_GEN + '"temperature": 0}}').encode())
        assert gen.status_code == 200 and gen.json()["meta_info"]["weight_version"] == "v\ud800"
    finally:
        _post(engine, "/update_weight_version", _body(new_version="default"))
    assert engine.weight_version == "default"


def test_model_dir_of_the_fixture_is_tiny(engine: Engine) -> None:
    """Guards against the fuzz budget silently growing: the fuzzed engine must keep the small limits that bound
    every accepted request (a real model or context here would make the CI run take minutes)."""
    assert engine.context_length == 160 and engine.config.max_request_items == 8
    assert Path(engine.config.model_path).name == "model"
