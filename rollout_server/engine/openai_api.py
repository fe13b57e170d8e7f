"""OpenAI-compatible /v1/chat/completions, /v1/completions and /v1/models on the built-in engine.

Enough of the OpenAI API for a local LLM judge: chat messages go through the tokenizer's chat template
(`chat_template_kwargs` are passed to it, e.g. enable_thinking), sampling maps onto the native
parameters, and `stream: true` sends `chat.completion.chunk` / `text_completion` deltas over SSE.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field

from rollout_server.engine.engine import ClientDisconnected, Engine, EngineOverloaded, Item, check_text
from rollout_server.engine.guard import SafeJSONResponse
from rollout_server.engine.protocol import GenerateReqInput


class ContentPart(BaseModel):
    """One part of a message's list-form content; only text parts are used."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    logprobs: bool = False

    def sampling_params(self, max_tokens: int | None) -> dict[str, Any]:
        return {
            "max_new_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "n": self.n,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "sampling_seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
        }


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions


def _openai_error(message: str, status: int = HTTPStatus.BAD_REQUEST) -> JSONResponse:
    return SafeJSONResponse(
        {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status},
        status_code=status,
    )


def _finish(out: dict[str, Any]) -> tuple[str | None, Any]:
    reason = out["meta_info"]["finish_reason"]
    if reason is None:
        return None, None
    return reason["type"], reason.get("matched")


def _content(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "".join(part.text for part in message.content if part.type == "text")


def _template_kwargs(tokenizer: Any, given: dict[str, Any] | None) -> dict[str, Any]:
    """`chat_template_kwargs` are template variables (enable_thinking, ...); names that apply_chat_template
    or the renderer use themselves (tokenize, messages, eos_token, ...) would change the call or fail it."""
    if not given:
        return {}
    reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters) | {"messages"}
    reserved |= set(getattr(tokenizer, "special_tokens_map", {}))
    bad = sorted(set(given) & reserved)
    if bad:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(bad)}")
    return given


def add_openai_routes(app: FastAPI, engine: Engine) -> None:
    def name(req: _SamplingFields) -> str:
        return req.model or engine.served_model_name

    def usage(items: list[Item], outputs: list[dict[str, Any]]) -> dict[str, int]:
        prompt = sum(len(it.input_ids) for it in items[:: max(1, items[0].params.n)]) if items else 0
        completion = sum(o["meta_info"]["completion_tokens"] for o in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def overloaded(e: EngineOverloaded) -> JSONResponse:
        response = _openai_error(str(e), HTTPStatus.SERVICE_UNAVAILABLE)
        response.headers["Retry-After"] = str(engine.config.overload_retry_after_s)
        return response

    async def collect(items: list[Item], request: Request) -> list[dict[str, Any]]:
        """Every item's final output (EngineOverloaded before anything is queued)."""
        outputs: list[dict[str, Any]] = [{} for _ in items]
        submitted = engine.submit(items, stream=False)
        async for i, out in engine.results(submitted, is_disconnected=request.is_disconnected):
            outputs[i] = out
        return outputs

    def stream_deltas(items: list[Item], make_chunk: Any) -> Response:
        try:
            submitted = engine.submit(items, stream=True)  # before the 200 goes out: a full queue is a 503
        except EngineOverloaded as e:
            return overloaded(e)

        async def gen() -> AsyncIterator[bytes]:
            from rollout_server.engine.api import sse

            sent = [0] * len(items)
            async with aclosing(engine.results(submitted)) as outputs:
                async for i, out in outputs:
                    text = out["text"]
                    delta, sent[i] = text[sent[i] :], len(text)
                    finish, _ = _finish(out)
                    if delta or finish:
                        yield sse(make_chunk(i, delta, finish))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.served_model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "longtrace",
                    "root": engine.served_model_name,
                    "max_model_len": engine.context_length,
                }
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
        try:
            text = engine.tokenizer.apply_chat_template(
                [{"role": m.role, "content": _content(m)} for m in req.messages],
                add_generation_prompt=True,
                tokenize=False,
                **_template_kwargs(engine.tokenizer, req.chat_template_kwargs),
            )
            input_ids = list(engine.tokenizer.encode(check_text(text, "messages"), add_special_tokens=False))
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            obj = GenerateReqInput(
                input_ids=input_ids, sampling_params=req.sampling_params(max_tokens), return_logprob=req.logprobs
            )
            items, _ = engine.prepare(obj)
        except (ValueError, TemplateError) as e:  # TemplateError: the template refused the messages
            return _openai_error(str(e))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:

            def chunk(i: int, delta: str, finish: str | None) -> dict[str, Any]:
                return {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name(req),
                    "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": delta}, "finish_reason": finish}
                    ],
                }

            return stream_deltas(items, chunk)
        try:
            outputs = await collect(items, request)
        except ClientDisconnected:
            return Response(status_code=499)
        except EngineOverloaded as e:
            return overloaded(e)
        choices = []
        for i, out in enumerate(outputs):
            finish, matched = _finish(out)
            logprobs = None
            if req.logprobs:
                logprobs = {
                    "content": [
                        {"token": engine.tokenizer.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                        for lp, t, _ in out["meta_info"]["output_token_logprobs"]
                    ]
                }
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": out["text"], "reasoning_content": None},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "matched_stop": matched,
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": name(req),
            "choices": choices,
            "usage": usage(items, outputs),
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        prompt = req.prompt
        try:
            if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
                obj = GenerateReqInput(text=prompt, sampling_params=req.sampling_params(req.max_tokens))
            else:
                obj = GenerateReqInput(input_ids=prompt, sampling_params=req.sampling_params(req.max_tokens))
            items, _ = engine.prepare(obj)
        except ValueError as e:
            return _openai_error(str(e))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:

            def chunk(i: int, delta: str, finish: str | None) -> dict[str, Any]:
                return {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": name(req),
                    "choices": [{"index": i, "text": delta, "logprobs": None, "finish_reason": finish}],
                }

            return stream_deltas(items, chunk)
        try:
            outputs = await collect(items, request)
        except ClientDisconnected:
            return Response(status_code=499)
        except EngineOverloaded as e:
            return overloaded(e)
        choices = [
            {
                "index": i,
                "text": out["text"],
                "logprobs": None,
                "finish_reason": _finish(out)[0],
                "matched_stop": _finish(out)[1],
            }
            for i, out in enumerate(outputs)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": name(req),
            "choices": choices,
            "usage": usage(items, outputs),
        }
