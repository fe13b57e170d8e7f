"""The eval's scoring: well-formed answers to the reward API's `/v1/score`, with retries; reward = outcome (η = 0)."""

from __future__ import annotations

from typing import Any

import httpx

from broker.schemas import Sample
from common.retry import RetryConfig, RetryPolicy
from eval.run import EvalError

# /v1/score computes the rubric only when η > 0 and asks the judge only when η < 1: any η strictly between
# returns both raw parts. The combined reward it returns is ignored, since with η = 0 the reward is the outcome.
BOTH_PARTS_ETA = 0.5


class _Retryable(Exception):
    """A reward API answer worth retrying (502/503/504)."""


class RewardClient:
    """POST /v1/score with retries on transport errors and 502/503/504; a 4xx is a clear error at once."""

    def __init__(self, http: httpx.AsyncClient, url: str, timeout_s: float, retry: RetryConfig) -> None:
        self._http = http
        self._url = url.rstrip("/")
        self._timeout = timeout_s
        # The deadline is at least one request's timeout: a request that fails after a long wait is still retried.
        self._retry = RetryPolicy(
            retry.max_attempts, retry.base_s, retry.max_backoff_s, max(retry.deadline_s, timeout_s)
        )

    async def judge_kind(self) -> str:
        try:
            r = await self._http.get(f"{self._url}/health", timeout=10.0)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise EvalError(f"--reward_url {self._url}: {type(e).__name__}: {e}") from e
        return str(r.json().get("judge", ""))

    async def score(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        async def once() -> list[dict[str, Any]]:
            r = await self._http.post(f"{self._url}/v1/score", json={"samples": samples}, timeout=self._timeout)
            if r.status_code in (502, 503, 504):
                raise _Retryable(f"{r.status_code}: {r.text[:300]}")
            if r.status_code == 401:
                raise EvalError(f"--reward_url {self._url}: 401 (set --reward_auth_token_env or _file): {r.text[:300]}")
            if r.status_code != 200:
                raise EvalError(f"--reward_url {self._url}/v1/score answered {r.status_code}: {r.text[:500]}")
            results: list[dict[str, Any]] = r.json()["results"]
            return results

        try:
            return await self._retry.acall(once, (httpx.TransportError, _Retryable), what="POST /v1/score")
        except (httpx.TransportError, _Retryable) as e:
            raise EvalError(f"--reward_url {self._url}/v1/score failed: {e!r}") from e


def score_request(row: Any, sample: Sample) -> dict[str, Any]:
    """An /evaluate body for a well-formed sample, as the launcher's eval and slime send it (history form)."""
    message = {"role": "assistant", "content": sample.content, "reasoning_content": sample.reasoning}
    info = {**row.extra_reward_info, "rubric_reward_ratio": BOTH_PARTS_ETA}
    return {"history": [message], "label": row.label, "extra_reward_info": info}
