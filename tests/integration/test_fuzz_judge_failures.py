"""Judge failures never become a reward of 0, on the one scoring route the judge tests did not cover:
POST /v1/score_group (a judge that errors, garbles its verdicts or hangs), against the stub judge API over HTTP.
(/evaluate and /v1/score: test_llm_judge.py; the stream worker: test_reward_worker.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reward_service.app import create_app
from reward_service.config import LlmJudgeConfig, RewardConfig
from reward_service.judges.llm import LlmJudge
from tests.helpers.judge_stub import StubJudgeApi

GROUP: dict[str, Any] = {
    "label": "Paris",
    "extra_reward_info": {"question": "Capital?", "rubrics": ["Paris", "France"], "rubric_reward_ratio": 0.3},
    "samples": [{"response": "<think>hm</think>Paris, France"}, {"response": "<think>hm</think>Lyon"}],
}


@pytest.fixture
def stub() -> Iterator[StubJudgeApi]:
    api = StubJudgeApi().start()
    yield api
    api.stop()


def _score_group(stub: StubJudgeApi, **config: Any) -> httpx.Response:
    cfg = RewardConfig.model_validate(
        {
            "judge": {"kind": "llm", "base_url": stub.url, "max_retries": 1, "backoff_base_s": 0.01, "max_asks": 2},
            **config,
        }
    )

    async def main() -> httpx.Response:
        assert isinstance(cfg.judge, LlmJudgeConfig)
        judge = LlmJudge(cfg.judge)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(create_app(cfg, judge)), base_url="http://t", timeout=30
            ) as client:
                return await client.post("/v1/score_group", json=GROUP)
        finally:
            await judge.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("action", "status", "needle"),
    [("500", 502, "HTTP 500"), ("garbled", 502, "judge failed"), ("malformed", 502, "judge failed")],
)
def test_score_group_judge_failure_is_an_error_never_zero(
    stub: StubJudgeApi, action: str, status: int, needle: str
) -> None:
    """Guards against /v1/score_group turning a failed judge into outcome 0 for the group (which the
    positive-only rule would then train on as wrong answers): the request must fail with the reason."""
    stub.default = action
    resp = _score_group(stub)
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["detail"]
    assert "rewards" not in resp.json()


def test_score_group_hanging_judge_is_504_never_zero(stub: StubJudgeApi) -> None:
    """Guards against a judge that never answers producing a reward after the deadline: 504 with the limit."""
    stub.default = "hang"
    resp = _score_group(stub, request_timeout_s=0.5)
    stub.release()
    assert resp.status_code == 504 and "0.5 s" in resp.json()["detail"]


def test_score_group_working_judge_scores(stub: StubJudgeApi) -> None:
    """Guards the negative control of the tests above: with the judge up the same group gets real rewards."""
    resp = _score_group(stub)
    assert resp.status_code == 200, resp.text
    rewards = resp.json()["rewards"]
    assert [r["outcome_reward"] for r in rewards] == [1.0, 0.0]
    assert rewards[0]["reward"] == 1.0 and rewards[1]["reward"] == 0.0  # positive-only: the wrong one gets 0
