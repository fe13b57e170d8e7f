"""A delayed OpenAI-compatible judge: the stand-in for the remote judge LLM in `longtrace bench async`.

A real judge (a 235B model behind an API) answers each call after about a second and serves a limited number
of calls at once; its latency is I/O for the reward worker, not local compute. This server models exactly that:
`POST /v1/chat/completions` waits for one of `concurrency` slots, sleeps `delay_s` (asyncio, no CPU), then
answers in the reference format (`extracted_final_answer: ... correct: yes|no`, yes when the gold answer occurs
in the response). It records when each call held a slot, so the bench can report the judge's busy time.

    python -m experiments.judge_stub --delay_s 1.0 --concurrency 8 --port 8000    (serves until Ctrl-C)
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from common.config import BaseConfig

_PROMPT_RE = re.compile(r"\[correct_answer\]: (.*?)\n\n\[response\]: (.*?)\n\nYour judgement", re.DOTALL)


class JudgeStubConfig(BaseConfig):
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = Field(0, ge=0, le=65535)
    """Port to bind; 0 picks a free one."""
    delay_s: float = Field(1.0, ge=0)
    """Seconds each call holds its slot before the verdict (the remote LLM's latency)."""
    concurrency: int = Field(8, ge=1)
    """Calls served at once; the others queue (the remote LLM's capacity)."""


@dataclass(frozen=True)
class Call:
    """One served call: when it was received, when it got a slot, when it answered (time.time())."""

    received_s: float
    start_s: float
    end_s: float


class JudgeStub:
    """The app and its call log; `serve()` runs it on a background thread (a context manager)."""

    def __init__(self, cfg: JudgeStubConfig) -> None:
        self.cfg = cfg
        self.calls: list[Call] = []
        self._lock = threading.Lock()  # the log is read from other threads
        self._slots = asyncio.Semaphore(cfg.concurrency)  # binds to the server's loop on first use
        # While True, every judge call is refused with 503 (an outage of the judge API: `longtrace bench chaos`).
        self.refusing = False
        self.refused = 0

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._complete, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/stats", self._stats, methods=["GET"]),
            ]
        )

    def serve(self) -> Any:
        """A started-on-enter BackgroundServer for this stub; its `.url` + "/v1" is the judge's base_url."""
        from rollout_server.engine.server import BackgroundServer

        return BackgroundServer(self.app(), host=self.cfg.host, port=self.cfg.port)

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    async def _complete(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        received = time.time()
        if self.refusing:
            with self._lock:
                self.refused += 1
            return JSONResponse({"error": {"message": "judge unavailable (stub outage)"}}, status_code=503)
        try:
            body = await request.json()
            prompt = body["messages"][0]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return JSONResponse({"error": {"message": "expected an OpenAI chat completion request"}}, status_code=400)
        match = _PROMPT_RE.search(prompt) if isinstance(prompt, str) else None
        if match is None:
            return JSONResponse({"error": {"message": "not the judge prompt (no [correct_answer]/[response])"}}, 400)
        async with self._slots:
            start = time.time()
            await asyncio.sleep(self.cfg.delay_s)
            end = time.time()
        with self._lock:
            self.calls.append(Call(received, start, end))
        gold, response = (g.strip() for g in match.groups())
        correct = bool(gold) and gold.lower() in response.lower()
        text = f"extracted_final_answer: {response[:200]}\nreasoning: stub\ncorrect: {'yes' if correct else 'no'}"
        return JSONResponse(
            {
                "object": "chat.completion",
                "model": str(body.get("model", "judge-stub")),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            }
        )

    async def _health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def _stats(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        calls = self.snapshot()
        return JSONResponse(
            {
                "calls": len(calls),
                "delay_s": self.cfg.delay_s,
                "concurrency": self.cfg.concurrency,
                "mean_queue_s": sum(c.start_s - c.received_s for c in calls) / len(calls) if calls else 0.0,
            }
        )


def main(argv: list[str] | None = None) -> None:
    """`python -m experiments.judge_stub [--config F] [--delay_s 1.0 --concurrency 8 ...]`: serve until Ctrl-C."""
    import argparse
    import logging

    from common.cli import add_config, run_cli, standalone
    from common.config import load_config

    def serve(args: argparse.Namespace) -> int:
        cfg = load_config(JudgeStubConfig, args.config, args.overrides)
        with JudgeStub(cfg).serve() as server:
            logging.getLogger(__name__).info(
                "judge stub on %s/v1 (delay %.2fs, %d at once)", server.url, cfg.delay_s, cfg.concurrency
            )
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
        return 0

    parser = standalone("python -m experiments.judge_stub", serve, overrides=True)
    add_config(parser, "TOML file of a JudgeStubConfig")
    run_cli(parser, argv)


if __name__ == "__main__":
    main()
