"""The LLM judge against a small local OpenAI-compatible stub (a stand-in for the remote judge LLM, which is
outside the product), over real HTTP: timeouts, 5xx, garbled verdicts, retries, the cache, and a judge
failure surfacing as an error (HTTP 502), never as a reward of 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reward_service.app import create_app
from reward_service.config import JudgeRetryConfig, LlmJudgeConfig, RewardConfig
from reward_service.judges import JudgeError
from reward_service.judges.llm import LlmJudge
from tests.helpers.judge_stub import StubJudgeApi as StubJudgeApi  # re-exported for older imports


@pytest.fixture
def stub() -> Iterator[StubJudgeApi]:
    api = StubJudgeApi().start()
    yield api
    api.stop()


def _judge(stub: StubJudgeApi, attempts: int = 4, **kw: Any) -> LlmJudge:
    retry = JudgeRetryConfig(max_attempts=attempts, base_s=0.01, max_backoff_s=0.05)
    fields: dict[str, Any] = {"base_url": stub.url, "retry": retry, "timeout_s": 5.0}
    fields.update(kw)
    return LlmJudge(LlmJudgeConfig(**fields))


async def _ask(judge: LlmJudge, *args: str) -> bool:
    try:
        return await judge.judge(*args)
    finally:
        await judge.aclose()


def test_verdicts_and_request_shape(stub: StubJudgeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a wrong request (model, prompt, the reference's thinking switch, bearer key) or a
    misread verdict."""
    monkeypatch.setenv("LT_TEST_JUDGE_KEY", "k-123")

    async def main() -> tuple[bool, bool]:
        judge = _judge(stub, api_key_env="LT_TEST_JUDGE_KEY", model="judge-m", temperature=0.0)
        try:
            return await judge.judge("Q?", "Paris", "It is Paris."), await judge.judge("Q?", "Rome", "It is Paris.")
        finally:
            await judge.aclose()

    assert asyncio.run(main()) == (True, False)
    req = stub.requests[0]
    assert req["model"] == "judge-m" and req["temperature"] == 0.0
    assert req["thinking"] == {"type": "disabled"}
    assert "[question]: Q?\n\n[correct_answer]: Paris\n\n[response]: It is Paris." in req["messages"][0]["content"]
    assert stub.headers[0]["authorization"] == "Bearer k-123"


def test_5xx_and_malformed_are_retried_then_succeed(stub: StubJudgeApi) -> None:
    """Guards against a transient API error failing the sample (or silently scoring it 0)."""
    stub.script.extend(["500", "malformed", "judge"])
    assert asyncio.run(_ask(_judge(stub, attempts=4), "Q", "Paris", "Paris")) is True
    assert len(stub.requests) == 3


def test_timeout_is_retried(stub: StubJudgeApi) -> None:
    """Guards against a hung judge request blocking forever instead of timing out and retrying."""
    stub.script.append("sleep:1")
    start = time.monotonic()
    assert asyncio.run(_ask(_judge(stub, timeout_s=0.3, attempts=3), "Q", "Paris", "Paris")) is True
    assert len(stub.requests) == 2
    assert time.monotonic() - start < 0.95


@pytest.mark.parametrize(
    "judge",
    [
        {"retry": {"max_attempts": 3, "base_s": 0.01}},
        {"max_retries": 2, "backoff_base_s": 0.01},  # the deprecated keys: 2 retries are 3 attempts
    ],
    ids=["retry", "deprecated_max_retries"],
)
def test_persistent_5xx_raises_judge_error_after_bounded_retries(stub: StubJudgeApi, judge: dict[str, Any]) -> None:
    """Guards against unbounded retries, against a dead judge turning into a verdict, and against the deprecated
    `max_retries` (a count of retries) being read as attempts after it moved to `retry.max_attempts`."""
    stub.default = "500"
    config = LlmJudgeConfig.model_validate({"base_url": stub.url, "timeout_s": 5.0, **judge})
    with pytest.raises(JudgeError, match="HTTP 500"):
        asyncio.run(_ask(LlmJudge(config), "Q", "Paris", "Paris"))
    assert len(stub.requests) == 3


def test_4xx_is_not_retried(stub: StubJudgeApi) -> None:
    """Guards against hammering an API that refused the request (bad key, bad model)."""
    stub.default = "401"
    with pytest.raises(JudgeError, match="refused"):
        asyncio.run(_ask(_judge(stub, attempts=4), "Q", "Paris", "Paris"))
    assert len(stub.requests) == 1


def test_garbled_verdicts_are_reasked_then_fail(stub: StubJudgeApi) -> None:
    """Guards against a garbled verdict being read as "no": re-ask up to max_asks, then raise."""
    stub.script.extend(["garbled", "garbled", "yes"])
    assert asyncio.run(_ask(_judge(stub), "Q", "Paris", "x")) is True
    assert len(stub.requests) == 3
    stub.default = "garbled"
    with pytest.raises(JudgeError, match="unparseable after 3 asks"):
        asyncio.run(_ask(_judge(stub), "Q", "Paris", "y"))
    assert len(stub.requests) == 6


def test_cache_judges_identical_keys_once_even_concurrently(stub: StubJudgeApi) -> None:
    """Guards against judging the same (question, label, answer) again, including 8 identical requests in
    flight at once; a failure is not cached."""
    stub.default = "sleep:0.2"

    async def main() -> list[bool]:
        judge = _judge(stub)
        try:
            same = await asyncio.gather(*(judge.judge("Q", "Paris", "Paris") for _ in range(8)))
            again = await judge.judge("Q", "Paris", "Paris")
            other = await judge.judge("Q", "Paris", "Rome")
            return [*same, again, other]
        finally:
            await judge.aclose()

    assert asyncio.run(main()) == [True] * 9 + [False]
    assert len(stub.requests) == 2


def test_concurrency_limit(stub: StubJudgeApi) -> None:
    """Guards against flooding the judge API beyond the configured number of requests in flight."""
    stub.default = "sleep:0.1"

    async def main() -> None:
        judge = _judge(stub, concurrency=2)
        try:
            await asyncio.gather(*(judge.judge("Q", "Paris", f"Paris {i}") for i in range(6)))
        finally:
            await judge.aclose()

    asyncio.run(main())
    assert len(stub.requests) == 6
    assert stub.max_inflight == 2


def test_failed_judge_is_http_502_never_zero(stub: StubJudgeApi) -> None:
    """Guards against the reference's behaviour of scoring a sample 0 when the judge is down: the API must
    answer 502 with the reason, and a working judge must still give 1 for a correct answer."""
    stub.default = "500"
    config = RewardConfig.model_validate(
        {"judge": {"kind": "llm", "base_url": stub.url, "retry": {"max_attempts": 2, "base_s": 0.01}}}
    )
    body = {
        "label": "Paris",
        "extra_reward_info": {"question": "Capital?", "rubrics": ["Paris"], "rubric_reward_ratio": 0.3},
        "response": "<think>hm</think>Paris",
    }

    async def main() -> list[httpx.Response]:
        assert isinstance(config.judge, LlmJudgeConfig)
        judge = LlmJudge(config.judge)
        app = create_app(config, judge)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
                failed = await client.post("/evaluate", json=body)
                batch = await client.post("/v1/score", json={"samples": [body, body]})
                stub.default = "judge"
                ok = await client.post("/evaluate", json=body)
        finally:
            await judge.aclose()
        return [failed, batch, ok]

    failed, batch, ok = asyncio.run(main())
    assert failed.status_code == 502 and "HTTP 500" in failed.json()["detail"]
    assert batch.status_code == 502
    assert ok.status_code == 200 and ok.json() == {"reward": 1.0, "outcome_reward": 1.0, "rubric_reward": 1.0}
