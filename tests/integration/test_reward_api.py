"""The real reward app: the /evaluate contract of the LongTraceRL reward server, /v1 batch and group scoring,
4xx (never 500) on malformed or oversized bodies, bearer auth, metrics, and `longtrace reward serve`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.net import free_port
from reward_service.app import create_app
from reward_service.config import RewardConfig
from reward_service.judges.llm import LlmJudge
from tests.helpers.judge_stub import StubJudgeApi
from tests.helpers.reward_server import HealthProbe, reward_server, wait_health

SLIME_BODY: dict[str, Any] = {
    # what slime's remote_rm posts with input_keys [label, extra_reward_info, history]
    "label": "RedOne",
    "extra_reward_info": {
        "question": "Who produced the debut single of the singer of The Fame?",
        "rubrics": ["Lady Gaga", "The Fame", "Just Dance", "RedOne"],
        "dataset_name": "longqa_v1",
        "rubric_reward_ratio": 0.3,
        "rubric_use_reasoning_content": False,
        "rubric_use_content": True,
        "source_doc_ids": [3, 7],
    },
    "history": [
        {"role": "user", "content": "Documents:\n<section>Lady Gaga ... The Fame ... Just Dance ...</section>\nQ?"},
        {
            "role": "assistant",
            "reasoning_content": "The Fame is Lady Gaga's album; Just Dance was produced by RedOne.",
            "content": "Lady Gaga's debut single Just Dance was produced by RedOne.",
        },
    ],
    "metadata_extra": {"ignored": True},
}


def _call(
    config: RewardConfig, *requests: tuple[str, str, Any], headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    """Send (method, path, json-or-bytes) requests to a fresh app through ASGI."""

    async def main() -> list[httpx.Response]:
        app = create_app(config)
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", headers=headers) as c:
            for method, path, body in requests:
                if isinstance(body, bytes):
                    out.append(
                        await c.request(method, path, content=body, headers={"content-type": "application/json"})
                    )
                else:
                    out.append(await c.request(method, path, json=body))
        return out

    return asyncio.run(main())


def test_evaluate_contract_slime_history_payload() -> None:
    """Guards against breaking drop-in compatibility: slime's payload (extra keys anywhere) gets exactly
    {reward, outcome_reward, rubric_reward} with the reference's numbers."""
    (resp,) = _call(RewardConfig(), ("POST", "/evaluate", SLIME_BODY))
    assert resp.status_code == 200
    # content hits Lady Gaga, Just Dance, RedOne (3/4); the answer contains the label
    assert resp.json() == {"reward": pytest.approx(0.7 + 0.3 * 0.75), "outcome_reward": 1.0, "rubric_reward": 0.75}


def test_evaluate_response_mode_and_eval_ratio() -> None:
    """Guards against response mode splitting differently from history mode, and η=0 (evaluation) not giving
    reward = outcome."""
    body = {
        "label": "RedOne",
        "extra_reward_info": {**SLIME_BODY["extra_reward_info"], "rubric_reward_ratio": 0.0},
        "response": "<think>Lady Gaga, The Fame</think>\n\nIt was RedOne.",
    }
    (resp,) = _call(RewardConfig(), ("POST", "/evaluate", body))
    assert resp.json() == {"reward": 1.0, "outcome_reward": 1.0, "rubric_reward": 0.0}


def test_score_batch_and_group() -> None:
    """Guards against /v1/score mixing up sample order, and /v1/score_group skipping the group maximum, the
    combination rule or training-mode zeroing."""
    info = {"question": "Q?", "rubrics": ["Alpha", "Beta"], "rubric_reward_ratio": 0.3}
    samples: list[dict[str, Any]] = [
        {"response": "</think>Alpha and Beta"},  # correct, raw 1.0
        {"response": "</think>Alpha only", "status": "completed"},  # wrong, raw 0.5
        {"response": "</think>Beta", "ill_formed": True},  # zeroed
        {"history": [{"role": "assistant", "content": "Alpha, Beta"}], "status": "truncated"},  # zeroed
    ]
    group = {"label": "Beta", "extra_reward_info": info, "samples": samples}
    batch = {"samples": [{"label": "Beta", "extra_reward_info": info, **s} for s in samples[:2]]}
    score, pos, both, evaluation = _call(
        RewardConfig(),
        ("POST", "/v1/score", batch),
        ("POST", "/v1/score_group", group),
        ("POST", "/v1/score_group", {**group, "combination": "both"}),
        ("POST", "/v1/score_group", {**group, "evaluation": True}),
    )
    assert [r["reward"] for r in score.json()["results"]] == pytest.approx([1.0, 0.15])
    pos_body = pos.json()
    assert pos_body["combination"] == "positive_only" and pos_body["max_raw_rubric_reward"] == 1.0
    assert [r["reward"] for r in pos_body["rewards"]] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert [r["zeroed_reason"] for r in pos_body["rewards"]] == ["", "", "ill_formed", "truncated"]
    assert [r["reward"] for r in both.json()["rewards"]] == pytest.approx([1.0, 0.15, 0.0, 0.0])
    # evaluation mode scores the flagged samples: "Beta" is right with half the rubric, "Alpha, Beta" fully
    assert [r["reward"] for r in evaluation.json()["rewards"]] == pytest.approx([1.0, 0.0, 0.85, 1.0])


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "json"),
        (b"[1, 2]", "body"),
        ({"extra_reward_info": {"question": "q"}, "response": "x"}, "label"),
        ({"label": "x", "extra_reward_info": {"question": "q"}}, "either 'history' or 'response'"),
        ({"label": "x", "extra_reward_info": {"question": "q"}, "history": []}, "must not be empty"),
        (
            {"label": "x", "extra_reward_info": {"question": "q", "rubric_reward_ratio": 1.5}, "response": "x"},
            "less than",
        ),
        ({"label": "x", "extra_reward_info": {"rubric_reward_ratio": 0.3}, "response": "x"}, "question is required"),
        (
            {
                "label": "x",
                "extra_reward_info": {"question": "q", "dataset_name": "longrlvr", "rubrics": ["c1"]},
                "response": "x",
            },
            "chunk ids",
        ),  # fmt: skip
        (
            {"label": "x", "extra_reward_info": {"question": "q"}, "history": [{"role": "assistant", "content": [1]}]},
            "must be a string",
        ),  # fmt: skip
        ({"label": "x", "extra_reward_info": {"question": "q"}, "response": 5}, "string"),
    ],
)
def test_malformed_bodies_get_422_with_reason(body: Any, needle: str) -> None:
    """Guards against malformed input crashing the server (500) or being scored, and against errors that do
    not say what is wrong."""
    (resp,) = _call(RewardConfig(), ("POST", "/evaluate", body))
    assert resp.status_code == 422, resp.text
    assert needle.lower() in resp.text.lower()


def test_v1_rejects_unknown_keys_and_oversized_batches() -> None:
    """Guards against a typo in a /v1 request (e.g. "combinaton") silently using the default rule, and against
    unbounded batches."""
    info = {"question": "q", "rubric_reward_ratio": 0.3}
    typo = {"label": "x", "extra_reward_info": info, "samples": [{"response": "x"}], "combinaton": "both"}
    big = {"samples": [{"label": "x", "extra_reward_info": info, "response": "x"}] * 3}
    r1, r2 = _call(RewardConfig(max_batch=2), ("POST", "/v1/score_group", typo), ("POST", "/v1/score", big))
    assert r1.status_code == 422 and "combinaton" in r1.text
    assert r2.status_code == 422 and "max_batch" in r2.text


_APP = create_app(RewardConfig())


_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_ANY_JSON = st.recursive(
    _LEAF,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=10,
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["assistant", "user"]) | _LEAF},
    optional={"content": _ANY_JSON, "reasoning_content": _ANY_JSON},
)
_INFO = st.fixed_dictionaries(
    {},
    optional={
        "question": _ANY_JSON,
        "rubrics": st.lists(_LEAF, max_size=4) | _ANY_JSON,
        "dataset_name": st.sampled_from(["longrlvr", "longqa"]) | _LEAF,
        "rubric_reward_ratio": _LEAF,
        "rubric_use_content": _LEAF,
        "rubric_use_reasoning_content": _LEAF,
    },
)
_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "label": _LEAF,
        "extra_reward_info": _INFO | _ANY_JSON,
        "history": st.lists(_MESSAGE, max_size=3) | _ANY_JSON,
        "response": st.text(alphabet="ab </think><useful_chunks>CHUNK_1", max_size=40) | _LEAF,
        "samples": st.lists(
            st.fixed_dictionaries(
                {}, optional={"response": _LEAF, "status": _LEAF, "label": _LEAF, "extra_reward_info": _INFO}
            ),
            max_size=3,
        ),
    },
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ANY_JSON | _SHAPED)
def test_random_json_never_500(body: Any) -> None:
    """Guards against any JSON body, however odd, making an endpoint crash with 500."""

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(_APP), base_url="http://t") as c:
            for path in ("/evaluate", "/v1/score", "/v1/score_group"):
                resp = await c.post(
                    path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
                )
                assert resp.status_code in (200, 422), (path, body, resp.status_code, resp.text)

    asyncio.run(main())


def test_body_limit_before_parsing() -> None:
    """Guards against parsing (and buffering without bound) a body over the limit, declared or streamed."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * 600_000

    async def main() -> list[httpx.Response]:
        app = create_app(RewardConfig(max_body_mb=1.0))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            declared = await c.post("/evaluate", content=b"x" * (1024 * 1024 + 1))
            streamed = await c.post("/evaluate", content=chunks())
            fine = await c.post("/evaluate", json={**SLIME_BODY})
        return [declared, streamed, fine]

    declared, streamed, fine = asyncio.run(main())
    assert declared.status_code == 413 and "max_body_mb" in declared.json()["detail"]
    assert streamed.status_code == 413
    assert fine.status_code == 200


def test_bearer_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against scoring requests without (or with a wrong) token when auth is on, and against locking
    out health checks and metrics scrapes."""
    monkeypatch.setenv("LT_TEST_REWARD_TOKEN", "tok-1")
    config = RewardConfig(auth_token_env="LT_TEST_REWARD_TOKEN")
    none, health, metrics = _call(
        config, ("POST", "/evaluate", SLIME_BODY), ("GET", "/health", None), ("GET", "/metrics", None)
    )
    (wrong,) = _call(config, ("POST", "/evaluate", SLIME_BODY), headers={"authorization": "Bearer tok-2"})
    assert none.status_code == 401 and wrong.status_code == 401
    assert none.headers["www-authenticate"] == "Bearer"
    assert health.status_code == 200 and metrics.status_code == 200
    (ok,) = _call(config, ("POST", "/evaluate", SLIME_BODY), headers={"authorization": "Bearer tok-1"})
    assert ok.status_code == 200


def _sample_value(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_judge_calls_and_errors() -> None:
    """Guards against /metrics missing requests, latencies, judge calls or errors (dashboards and alerts)."""
    (before,) = _call(RewardConfig(), ("GET", "/metrics", None))
    *_, after = _call(
        RewardConfig(), ("POST", "/evaluate", SLIME_BODY), ("POST", "/evaluate", b"{"), ("GET", "/metrics", None)
    )
    assert after.headers["content-type"].startswith("text/plain")
    for name, labels, delta in [
        ("reward_http_requests_total", 'route="/evaluate",status="200"', 1),
        ("reward_http_requests_total", 'route="/evaluate",status="422"', 1),
        ("reward_http_request_seconds_count", 'route="/evaluate"', 2),
        ("reward_judge_calls_total", 'judge="rule",result="yes"', 1),
        ("reward_errors_total", 'kind="bad_request"', 1),
    ]:
        assert _sample_value(after.text, name, labels) - _sample_value(before.text, name, labels) == delta, name
    assert "# HELP reward_judge_cache_hits_total" in after.text


def test_openapi_documents_the_routes() -> None:
    """Guards against the API docs missing a route or its typed request body."""
    (resp,) = _call(RewardConfig(), ("GET", "/openapi.json", None))
    spec = resp.json()
    assert {"/evaluate", "/v1/score", "/v1/score_group", "/health"} <= set(spec["paths"])
    assert "EvaluateRequest" in json.dumps(spec["paths"]["/evaluate"])


def test_cli_serve_real_http(tmp_path: Any) -> None:
    """Guards against `longtrace reward serve` not starting, not applying overrides (η, body limit, auth), or
    the limits not holding over real HTTP."""
    port = free_port()
    env = {**os.environ, "LT_TEST_REWARD_TOKEN": "tok-9"}
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port), "--max_body_mb", "0.5",
           "--auth_token_env", "LT_TEST_REWARD_TOKEN", "--eta", "0.5"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log, 30)
        auth = {"authorization": "Bearer tok-9"}
        body = {**SLIME_BODY, "extra_reward_info": {**SLIME_BODY["extra_reward_info"], "rubric_reward_ratio": None}}
        resp = httpx.post(f"{url}/evaluate", json=body, headers=auth, timeout=10)
        assert resp.status_code == 200 and resp.json()["reward"] == pytest.approx(0.5 + 0.5 * 0.75)  # --eta 0.5
        big = httpx.post(f"{url}/evaluate", content=b"x" * 600_000, headers=auth, timeout=10)
        assert big.status_code == 413
        assert httpx.post(f"{url}/evaluate", json=SLIME_BODY, timeout=10).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_regex_bomb_answers_within_a_bound_while_health_answers(tmp_path: Path) -> None:
    """Guards against defect 5 (issue 19): 1 MB of repeated <useful_chunks> tags made the reference regex rescan to
    the end from every opening tag (minutes), synchronously in the handler, so neither the request timeout nor
    /health could answer. Real uvicorn, so a blocked event loop shows."""
    bomb = "<useful_chunks><CHUNK_1></useful_chunks>" + "<useful_chunks>" * 70_000
    info = {"rubrics": [1, 2], "dataset_name": "longrlvr", "rubric_reward_ratio": 1.0}
    with reward_server(tmp_path / "serve.log") as url, HealthProbe(url).running() as probe:
        time.sleep(0.3)
        start = time.perf_counter()
        resp = httpx.post(
            f"{url}/evaluate", json={"label": "x", "extra_reward_info": info, "response": bomb}, timeout=30
        )
        elapsed_s = time.perf_counter() - start
        time.sleep(0.3)
    assert resp.status_code == 200, resp.text
    assert resp.json()["rubric_reward"] == pytest.approx(5 / 9)  # F2 of {1} against {1, 2}: the last block only
    assert elapsed_s < 10.0
    assert not probe.failures and len(probe.latencies_s) >= 5 and max(probe.latencies_s) < 1.0, probe


def test_cpu_heavy_scoring_past_its_timeout_is_504_while_health_answers(tmp_path: Path) -> None:
    """Guards against scoring that its deadline cannot interrupt: 40k rubrics over a 1.5 MB answer (linear, but
    ~20 s of scanning) ran on the event loop, so `request_timeout_s` could not fire (a late 200 instead of a 504)
    and /health hung meanwhile. The 504 names the flag."""
    answer = " ".join(f"w{i}" for i in range(200_000))
    info = {"rubrics": [f"absent entity {i}" for i in range(40_000)], "rubric_reward_ratio": 1.0}
    with reward_server(tmp_path / "serve.log", "--request_timeout_s", "1") as url, HealthProbe(url).running() as probe:
        time.sleep(0.3)
        start = time.perf_counter()
        resp = httpx.post(f"{url}/evaluate", json={"label": "x", "extra_reward_info": info, "response": answer},
                          timeout=60)  # fmt: skip
        elapsed_s = time.perf_counter() - start
        time.sleep(0.3)
    assert resp.status_code == 504, resp.text
    assert "longer than 1 s" in resp.json()["detail"] and "--request_timeout_s" in resp.json()["detail"]
    assert elapsed_s < 5.0
    assert not probe.failures and len(probe.latencies_s) >= 5 and max(probe.latencies_s) < 1.0, probe


def test_concurrent_large_bodies_are_bounded_by_a_budget() -> None:
    """Guards against many large bodies at once exhausting memory (each is buffered, then parsed into several times
    its size, and held while its judge call runs): a body that would take the bytes in flight past
    `max_concurrent_body_mb` gets 503 with Retry-After and the flag, small requests still fit beside the held
    ones, and the budget comes back when the requests end."""
    stub = StubJudgeApi().start()
    stub.default = "hang"  # admitted requests stay in flight, inside their judge call
    config = RewardConfig.model_validate(
        {"max_body_mb": 1.0, "max_concurrent_body_mb": 2.0, "judge": {"kind": "llm", "base_url": stub.url}}
    )

    def big(i: int) -> dict[str, Any]:  # about 0.9 MB
        return {"label": "Beta", "extra_reward_info": {"question": "q", "rubrics": ["Beta"]},
                "response": f"</think>Beta {i} " + "x" * 900_000}  # fmt: skip

    small = {"label": "x", "extra_reward_info": {"rubrics": ["x"], "rubric_reward_ratio": 1.0}, "response": "x"}

    async def main() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response]:
        judge = LlmJudge(config.judge)  # type: ignore[arg-type]
        app = create_app(config, judge=judge)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=30) as c:
            held = [asyncio.create_task(c.post("/evaluate", json=big(i))) for i in range(5)]
            deadline = time.monotonic() + 20
            while len(stub.requests) < 2 or sum(t.done() for t in held) < 3:
                assert time.monotonic() < deadline, (len(stub.requests), [t.done() for t in held])
                await asyncio.sleep(0.02)
            beside = [await c.post("/evaluate", json=small), await c.get("/health")]
            stub.release()
            first = list(await asyncio.gather(*held))
            after = await c.post("/evaluate", json=big(9))
        await judge.aclose()
        return first, beside, after

    try:
        first, beside, after = asyncio.run(main())
    finally:
        stub.stop()
    assert sorted(r.status_code for r in first) == [200, 200, 503, 503, 503]
    for r in first:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "--max_concurrent_body_mb" in r.json()["detail"]
    assert len(stub.requests) == 3  # the refused bodies never reached the judge
    assert [r.status_code for r in beside] == [200, 200]
    assert after.status_code == 200


def test_serve_with_several_processes_answers_and_stops(tmp_path: Path) -> None:
    """Guards against `reward serve --num_processes 2` not starting its workers (each builds the app from the
    config it is handed: an override lost on the way changes rewards), or leaving them running after SIGTERM."""
    import psutil

    port = free_port()
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port), "--num_processes", "2",
           "--eta", "0.5"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log, 60)
        body = {**SLIME_BODY, "extra_reward_info": {**SLIME_BODY["extra_reward_info"], "rubric_reward_ratio": None}}
        with httpx.Client(timeout=10) as c:
            rewards = [c.post(f"{url}/evaluate", json=body).json()["reward"] for _ in range(16)]
        assert rewards == [pytest.approx(0.5 + 0.5 * 0.75)] * 16  # --eta 0.5 in every worker
        workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in psutil.Process(proc.pid).children()]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() for w in workers)  # gone with their supervisor, not orphaned
