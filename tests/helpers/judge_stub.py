"""A small local OpenAI-compatible judge API (a stand-in for the remote judge LLM, which is outside the product),
served over real HTTP by uvicorn, scriptable per request. Used by the LLM judge, reward worker and judge-failure
tests."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from common.net import free_port

_ANSWER_RE = re.compile(r"\[correct_answer\]: (.*?)\n\n\[response\]: (.*?)\n\nYour judgement", re.DOTALL)


class StubJudgeApi:
    """An OpenAI-compatible /v1/chat/completions on a free port, run by uvicorn in a thread.

    Each request takes the next scripted action, else `default`: "judge" (a verdict: yes when the gold
    answer occurs in the response, case-insensitively), "yes", "no", "garbled", "malformed" (200 with a
    body that is no completion), "500", "401", "sleep:S" (then judge), "hang" (until `release()`, then judge).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.script: deque[str] = deque()
        self.default = "judge"
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.inflight = 0
        self.max_inflight = 0
        self._released = threading.Event()
        app = Starlette(routes=[Route("/v1/chat/completions", self._complete, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> StubJudgeApi:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "stub judge API did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._released.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def release(self) -> None:
        self._released.set()

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        action = self.script.popleft() if self.script else self.default
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if action.startswith("sleep:"):
                await asyncio.sleep(float(action.split(":", 1)[1]))
                action = "judge"
            if action == "hang":
                while not self._released.is_set():
                    await asyncio.sleep(0.02)
                action = "judge"
            if action in ("500", "401"):
                return PlainTextResponse("stub error", status_code=int(action))
            if action == "malformed":
                return JSONResponse({"object": "error"})
            if action == "judge":
                gold, response = _ANSWER_RE.search(body["messages"][0]["content"]).groups()  # type: ignore[union-attr]
                action = "yes" if gold.strip().lower() in response.lower() else "no"
            text = {
                "yes": "extracted_final_answer: X\nreasoning: matches\ncorrect: yes",
                "no": "extracted_final_answer: Y\nreasoning: differs\ncorrect: no",
                "garbled": "I believe the response is probably fine.",
            }[action]
            return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        finally:
            self.inflight -= 1
