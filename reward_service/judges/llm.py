"""LLM outcome judge over any OpenAI-compatible chat API (the LongTraceRL reference judge, METHOD.md §2).

One pool of keep-alive connections (judges/http.py: a lean HTTP/1.1 client, msgspec for the JSON); at most
`concurrency` requests in flight; each request retried on transport errors, timeouts, HTTP 408/429/5xx and
malformed bodies with jittered backoff (common.retry.RetryPolicy); the judge re-asked up to `max_asks` times
until both `extracted_final_answer:` and `correct:` parse.
Verdicts are cached by (question, label, answer); concurrent requests for the same key share one call.
When no verdict can be had the judge raises JudgeError, never returns False in its place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from typing import Any

import msgspec

from common.retry import RetryPolicy
from reward_service.config import LlmJudgeConfig
from reward_service.judges.base import JudgeError
from reward_service.judges.http import Http1Pool, HttpTransportError
from reward_service.metrics import JUDGE_API_REQUESTS, JUDGE_CACHE_HITS, JUDGE_CALLS, JUDGE_SECONDS

log = logging.getLogger(__name__)

JUDGE_PROMPT = """Judge whether the following [response] to [question] is correct or not based on the precise and unambiguous [correct_answer] below.

[question]: {question}

[correct_answer]: {correct_answer}

[response]: {response}

Your judgement must be in the format and criteria specified below:

extracted_final_answer: The final exact answer extracted from the [response]. Put the extracted answer as "None" if there is no exact, final answer to extract from the response.

reasoning: Explain why the extracted_final_answer is correct or incorrect based on [correct_answer], focusing only on if there are meaningful differences between [correct_answer] and the extracted_final_answer. Do not comment on any background to the problem, do not attempt to solve the problem, do not argue for any answer different than [correct_answer], focus only on whether the answers match.

correct: Answer "yes" if extracted_final_answer matches the [correct_answer] given above, or is within a small margin of error for numerical problems. Answer "no" otherwise, i.e. if there if there is any inconsistency, ambiguity, non-equivalency, or if the extracted answer is incorrect.
"""  # noqa: E501  (the reference prompt, word for word, including its typo)

_CORRECT_RE = re.compile(r"(?i)\*{0,2}correct\*{0,2}\s*:\s*(no|yes)")
_EXTRACTED_RE = re.compile(r"(?i)\*{0,2}extracted_final_answer\*{0,2}\s*:\s*(.+)")


class _Message(msgspec.Struct):
    content: Any  # required (a body without it is malformed); null is an empty reply


class _Choice(msgspec.Struct):
    message: _Message


class _Completion(msgspec.Struct):
    """What the judge reads of a chat.completion body (other keys ignored)."""

    choices: list[_Choice]


_COMPLETION = msgspec.json.Decoder(_Completion)
_ENCODER = msgspec.json.Encoder()


def _text(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", "replace")


class _Transient(Exception):
    """A failed API request worth retrying (5xx, 408, 429, malformed body)."""


def judge_prompt(question: str, label: str, response: str) -> str:
    return JUDGE_PROMPT.format(question=question, correct_answer=label, response=response)


def parse_verdict(text: str) -> bool | None:
    """True/False when both fields parse (the reference's regexes), None when the reply is garbled."""
    correct = _CORRECT_RE.search(text)
    extracted = _EXTRACTED_RE.search(text)
    if correct is None or extracted is None:
        return None
    return correct.group(1).lower() == "yes"


def _cache_key(question: str, label: str, response: str) -> bytes:
    # A digest keeps the cache small (responses are tens of KB); the lengths make the encoding unambiguous.
    h = hashlib.blake2b(digest_size=20)
    for part in (question, label, response):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


class LlmJudge:
    kind = "llm"

    def __init__(self, config: LlmJudgeConfig) -> None:
        self.config = config
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # no proxy from the environment: a judge on the cluster network must not go through one
        self._client = Http1Pool(config.base_url, headers, config.timeout_s, max_idle=config.concurrency)
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._retry: RetryPolicy = config.retry.policy()
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[bool]] = {}

    async def judge(self, question: str, label: str, response: str) -> bool:
        key = _cache_key(question, label, response)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            JUDGE_CACHE_HITS.labels("cache").inc()
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._judge_uncached(key, question, label, response))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        else:
            JUDGE_CACHE_HITS.labels("inflight").inc()
        # shield: one waiter being cancelled must not cancel the call the others are waiting for
        return await asyncio.shield(task)

    def _forget(self, key: bytes, task: asyncio.Task[bool]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: when every waiter was cancelled nobody else reads it

    async def _judge_uncached(self, key: bytes, question: str, label: str, response: str) -> bool:
        start = time.perf_counter()
        messages = [{"role": "user", "content": judge_prompt(question, label, response)}]
        reply = ""
        try:
            for ask in range(1, self.config.max_asks + 1):
                reply = await self._complete(messages)
                verdict = parse_verdict(reply)
                if verdict is not None:
                    break
                log.warning("judge reply unparseable (ask %d/%d): %.200r", ask, self.config.max_asks, reply)
            else:
                raise JudgeError(
                    f"judge verdict unparseable after {self.config.max_asks} asks; last reply: {reply[:300]!r}"
                )
        except JudgeError:
            JUDGE_CALLS.labels(self.kind, "error").inc()
            raise
        JUDGE_SECONDS.labels(self.kind).observe(time.perf_counter() - start)
        JUDGE_CALLS.labels(self.kind, "yes" if verdict else "no").inc()
        if self.config.cache_size > 0:
            self._cache[key] = verdict
            if len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return verdict

    async def _complete(self, messages: list[dict[str, str]]) -> str:
        """One chat completion's text, with bounded retries; JudgeError when it cannot be had."""
        body: dict[str, Any] = {"model": self.config.model, "messages": messages, **self.config.extra_body}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        retry_on = (_Transient, TimeoutError, HttpTransportError)
        try:
            return await self._retry.acall(lambda: self._post(body), retry_on=retry_on, what="judge API request")
        except retry_on as e:
            raise JudgeError(f"judge API failed after retries: {type(e).__name__}: {e}") from e

    async def _post(self, body: dict[str, Any]) -> str:
        try:
            payload = _ENCODER.encode(body)
        except (
            msgspec.EncodeError,
            UnicodeEncodeError,
        ):  # a lone surrogate from a \ud800 escape: UTF-8 cannot carry it, JSON escapes can
            payload = json.dumps(body).encode()
        async with self._semaphore:
            try:
                status, data = await self._client.post("chat/completions", payload)
            except (TimeoutError, HttpTransportError):
                JUDGE_API_REQUESTS.labels("transport_error").inc()
                raise
        if status >= 500 or status in (408, 429):
            JUDGE_API_REQUESTS.labels(f"http_{status // 100}xx").inc()
            raise _Transient(f"HTTP {status}: {_text(data, 200)}")
        if status >= 400:
            # bad model name, bad key, quota: retrying cannot help
            JUDGE_API_REQUESTS.labels("http_4xx").inc()
            raise JudgeError(f"judge API refused the request: HTTP {status}: {_text(data, 300)}")
        try:
            content = _COMPLETION.decode(data).choices[0].message.content
        except (msgspec.DecodeError, IndexError) as e:
            JUDGE_API_REQUESTS.labels("malformed").inc()
            raise _Transient(f"malformed completion body: {_text(data, 200)!r}") from e
        JUDGE_API_REQUESTS.labels("ok").inc()
        # a null content (e.g. a refusal) is an empty, hence unparseable, reply: it gets re-asked
        return content if isinstance(content, str) else ""

    async def aclose(self) -> None:
        await self._client.aclose()
