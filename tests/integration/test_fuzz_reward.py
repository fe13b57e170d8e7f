"""Hostile input against the reward service's HTTP API: schemathesis from its OpenAPI schema (in-process and over
real HTTP with auth on) and a corpus of hand-made bodies. No 5xx ever; every 4xx names the problem."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest

from experiments.fuzz import FuzzReport, fuzz_app, fuzz_url, reason_of, reward_app
from reward_service.app import create_app
from reward_service.config import RewardConfig
from rollout_server.engine.server import BackgroundServer

# CI-sized: each run takes seconds; `longtrace bench fuzz` runs a larger budget.
MAX_EXAMPLES = 10


def _check(report: FuzzReport, endpoints: int) -> None:
    assert report.ok, "\n".join(report.failures)
    assert report.endpoints == endpoints
    # Positive bodies must reach the scorer: a schema too loose to generate valid requests fuzzes nothing.
    assert report.by_status[200] >= 10, report.as_dict()
    assert report.by_status[422] >= 10, report.as_dict()


def test_schemathesis_in_process_no_5xx_and_every_4xx_has_a_reason() -> None:
    """Guards against any generated body (valid or invalid by the schema) crashing the reward API (5xx) or being
    refused without saying why, and against a schema too loose to generate accepted bodies."""
    report = fuzz_app(reward_app(), max_examples=MAX_EXAMPLES)
    _check(report, endpoints=4)  # /evaluate, /v1/score, /v1/score_group, /health


def test_schemathesis_over_http_with_auth() -> None:
    """Guards against failures that only a real socket shows (uvicorn's parser, chunked bodies, headers) and
    against bearer auth refusing a correctly authenticated client."""
    with BackgroundServer(reward_app(token="fuzz-token-1")) as server:
        report = fuzz_url(server.url, headers={"Authorization": "Bearer fuzz-token-1"}, max_examples=MAX_EXAMPLES // 2)
        assert httpx.post(f"{server.url}/evaluate", json={}, timeout=10).status_code == 401
    assert report.ok, "\n".join(report.failures)
    assert report.by_status[401] == 0 and report.by_status[200] > 0, report.as_dict()


_INFO = '"extra_reward_info": {"question": "q", "rubrics": ["Paris"]}'
HOSTILE: list[tuple[str, str, bytes]] = [
    (
        "lone surrogate in the answer",
        "/evaluate",
        b'{"label": "Paris", ' + _INFO.encode() + b', "response": "\\ud800"}',
    ),
    ("lone surrogate in a key", "/v1/score_group", b'{"\\udfff": 1}'),
    ("NaN label", "/evaluate", b'{"label": NaN, ' + _INFO.encode() + b', "response": "x"}'),
    ("infinite label", "/evaluate", b'{"label": 1e999, ' + _INFO.encode() + b', "response": "x"}'),
    ("huge integer label", "/evaluate", b'{"label": ' + b"9" * 5000 + b", " + _INFO.encode() + b', "response": "x"}'),
    ("deep nesting", "/evaluate", b"[" * 100_000 + b"]" * 100_000),
    ("deep nesting in an ignored key", "/evaluate", b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("invalid UTF-8", "/evaluate", b'{"label": "\xff\xfe", ' + _INFO.encode() + b', "response": "x"}'),
    ("empty body", "/v1/score", b""),
    ("JSON null", "/v1/score", b"null"),
    ("string body", "/v1/score_group", b'"samples"'),
    (
        "NaN ratio",
        "/evaluate",
        b'{"label": "x", "extra_reward_info": {"question": "q", "rubric_reward_ratio": NaN}, "response": "x"}',
    ),  # fmt: skip
    (
        "chunk id overflow",
        "/evaluate",
        b'{"label": "x", "extra_reward_info": {"question": "q", "dataset_name": '
        b'"longrlvr", "rubrics": [1e400]}, "response": "x"}',
    ),  # fmt: skip
    (
        "lone surrogate chunk id",
        "/evaluate",
        b'{"label": "x", "extra_reward_info": {"question": "q", "dataset_name": '
        b'"longrlvr", "rubrics": ["\\ud800"]}, "response": "x"}',
    ),  # fmt: skip
]


@pytest.mark.parametrize(("name", "path", "body"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_a_reasoned_4xx_or_a_score(name: str, path: str, body: bytes) -> None:
    """Guards against inputs a schema-driven fuzzer does not generate (lone surrogates, NaN, deep nesting,
    invalid UTF-8) crashing the API with 500: each gets a 4xx that names the problem, or a proper score."""

    async def main() -> httpx.Response:
        app = create_app(RewardConfig())
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, content=body, headers={"content-type": "application/json"})

    resp = asyncio.run(main())
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert reason_of(resp.content), resp.text
    else:
        assert set(resp.json()) == {"reward", "outcome_reward", "rubric_reward"}


def test_nan_and_infinite_labels_are_refused_not_scored_zero() -> None:
    """Guards against a NaN or infinite gold answer being judged (always wrong, reward 0) instead of refused."""
    responses: list[httpx.Response] = []

    async def main() -> None:
        app = create_app(RewardConfig())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            for label in (b"NaN", b"Infinity", b"-1e999"):
                body = b'{"label": ' + label + b', "extra_reward_info": {"question": "q"}, "response": "x"}'
                responses.append(
                    await client.post("/evaluate", content=body, headers={"content-type": "application/json"})
                )

    asyncio.run(main())
    assert [r.status_code for r in responses] == [422, 422, 422]
    assert all("finite" in r.text for r in responses)


def test_fuzz_bench_reports_the_figures(tmp_path: Any) -> None:
    """Guards against `longtrace bench fuzz` printing something other than the promised JSON figures."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "experiments.fuzz_cli", "--json", "--max-examples", "2", "--services", "reward"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=True,
    )
    doc = json.loads(out.stdout)
    assert {"requests", "status_5xx", "status_4xx_without_reason", "endpoints"} <= set(doc)
    assert doc["requests"] > 0 and doc["status_5xx"] == 0 and doc["endpoints"] >= 4
