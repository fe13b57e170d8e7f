"""OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models and /v1/models/{id} on the built-in engine,
as SGLang serves them (srt/entrypoints/openai/serving_chat.py, serving_completions.py, http_server.py).

Enough of the OpenAI API for a local LLM judge: chat messages go through the tokenizer's chat template
(`chat_template_kwargs` are passed to it, e.g. enable_thinking), sampling maps onto the native parameters
(openai_protocol.py; what the engine cannot honour is refused with a 400 naming the field), and `stream: true`
sends `chat.completion.chunk` / `text_completion` deltas over SSE, with a usage chunk on
`stream_options.include_usage`. Non-streamed answers carry `metadata.weight_version` (the weights that produced
them), as SGLang's do.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi import Path as FastAPIPath
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError

from rollout_server.engine.engine import ClientDisconnected, Engine, EngineOverloaded, Item, check_text
from rollout_server.engine.guard import SafeJSONResponse
from rollout_server.engine.openai_format import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    model_card,
    response_usage,
    stream_usage,
    usage,
    weight_metadata,
)
from rollout_server.engine.openai_protocol import (
    CHAT_REFUSED,
    COMPLETION_REFUSED,
    ChatCompletionRequest,
    CompletionRequest,
    model_sampling_defaults,
)
from rollout_server.engine.protocol import GenerateReqInput
from rollout_server.engine.sampling import UnsupportedField
from rollout_server.engine.top_logprobs import TopLogprobsNumTooLarge

Chunks = Callable[[int, dict[str, Any]], list[dict[str, Any]]]


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


def _template_kwargs(tokenizer: Any, given: dict[str, Any]) -> dict[str, Any]:
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


def _text_only(req: ChatCompletionRequest) -> None:
    """The engine's models read text: another content part (an image, audio) would be dropped, so it is refused."""
    for i, message in enumerate(req.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type != "text":
                raise UnsupportedField(f"messages[{i}].content[{j}].type", part.type)


def _echo_prompts(req: CompletionRequest, tokenizer: Any) -> list[str]:
    """The text `echo` puts before each prompt's completions (token prompts decoded, as SGLang does)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], str):
        return [p for p in prompt if isinstance(p, str)]
    batches = prompt if prompt and isinstance(prompt[0], list) else [prompt]
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in batches]


@dataclass
class _Sent:
    """What one choice of a stream has sent so far."""

    started: bool = False
    text: int = 0
    logprobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def advance(self, out: dict[str, Any]) -> tuple[str, list[Any], list[Any]]:
        """The text not sent yet, and the logprob entries and their top-logprob rows not sent yet (kept until a chunk
        carries them; SGLang slices both at the tokens sent so far, serving_chat.py `_process_streaming_logprobs`)."""
        text, meta = out["text"], out["meta_info"]
        if meta["finish_reason"] is None:  # a character whose last bytes are still to come: sent once complete
            text = text.rstrip("\ufffd")
        delta, self.text = text[self.text :], max(self.text, len(text))
        self.prompt_tokens, self.completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
        sent = self.logprobs
        return (
            delta,
            list(meta.get("output_token_logprobs", [])[sent:]),
            list(meta.get("output_top_logprobs", [])[sent:]),
        )


def add_openai_routes(app: FastAPI, engine: Engine) -> None:
    names = TokenText(engine.tokenizer)
    model_defaults = model_sampling_defaults(engine.config.model_path)

    def overloaded(e: EngineOverloaded) -> JSONResponse:
        response = _openai_error(str(e), HTTPStatus.SERVICE_UNAVAILABLE)
        response.headers["Retry-After"] = str(engine.config.overload_retry_after_s)
        return response

    def prepare(req: CompletionRequest | ChatCompletionRequest, obj: GenerateReqInput) -> list[Item]:
        """The native path's validation; its refusals reworded to name the field this request sent."""
        try:
            return engine.prepare(obj)[0]
        except UnsupportedField as e:
            raise ValueError(req.refusal(e)) from None
        except TopLogprobsNumTooLarge as e:
            raise ValueError(e.named(req.client_name(UnsupportedField(e.key)))) from None

    async def answer(
        items: list[Item],
        request: Request,
        head: dict[str, Any],
        choice: Callable[[int, dict[str, Any]], dict[str, Any]],
        n: int,
    ) -> Response | dict[str, Any]:
        """Every item's final output, as the answer's choices with usage and the weight version (503 before
        anything is queued when full)."""
        outputs: list[dict[str, Any]] = [{} for _ in items]
        try:
            submitted = engine.submit(items, stream=False)
            async for i, out in engine.results(submitted, is_disconnected=request.is_disconnected):
                outputs[i] = out
        except ClientDisconnected:
            return Response(status_code=499)
        except EngineOverloaded as e:
            return overloaded(e)
        except RuntimeError as e:  # the scheduler is gone
            return _openai_error(str(e), HTTPStatus.SERVICE_UNAVAILABLE)
        return {
            **head,
            "choices": [choice(i, out) for i, out in enumerate(outputs)],
            "usage": response_usage(outputs, n),
            "metadata": weight_metadata(outputs[0]["meta_info"]),
        }

    def stream(items: list[Item], chunks: Chunks, tail: Callable[[], list[dict[str, Any]]]) -> Response:
        """SSE of `chunks(index, output)` per engine output, then `tail()`, then [DONE]."""
        try:
            submitted = engine.submit(items, stream=True)  # before the 200 goes out: a full queue is a 503
        except EngineOverloaded as e:
            return overloaded(e)
        except RuntimeError as e:
            return _openai_error(str(e), HTTPStatus.SERVICE_UNAVAILABLE)

        async def gen() -> AsyncIterator[bytes]:
            from rollout_server.engine.api import sse

            async with aclosing(engine.results(submitted)) as outputs:
                async for i, out in outputs:
                    for chunk in chunks(i, out):
                        yield sse(chunk)
            for chunk in tail():
                yield sse(chunk)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    def usage_options(req: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
        options = req.stream_options
        if options is None:
            return False, False
        return bool(options.include_usage), bool(options.continuous_usage_stats)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(engine.served_model_name, engine.context_length)]}

    # The schema names the one model served (the fuzzer's valid cases find it); any other id is a 404 naming it.
    served_id = FastAPIPath(json_schema_extra={"enum": [engine.served_model_name]})

    @app.get("/v1/models/{model:path}", response_model=None)
    async def retrieve_model(model: str = served_id) -> Response | dict[str, Any]:
        if model != engine.served_model_name:
            return SafeJSONResponse(
                {
                    "error": {
                        "message": f"The model '{model}' does not exist",
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": "model_not_found",
                    }
                },
                status_code=HTTPStatus.NOT_FOUND,
            )
        return model_card(model, engine.context_length)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        # The engine's rid is the answer's id (SGLang's meta_info id): /abort_request takes it.
        rid = req.rid if req.rid is not None else f"cmpl-{uuid.uuid4().hex}"
        try:
            req.refuse(COMPLETION_REFUSED)
            items = prepare(req, req.to_generate(rid))
        except ValueError as e:
            return _openai_error(str(e))
        echo = _echo_prompts(req, engine.tokenizer) if req.echo else None
        head = {
            "id": rid if isinstance(rid, str) else rid[0],
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model or engine.served_model_name,
        }

        def logprobs(triples: list[Any], top: list[Any] | None) -> dict[str, Any] | None:
            if req.logprobs is None:
                return None
            return completion_logprobs(names, triples, top)

        def choice(i: int, out: dict[str, Any]) -> dict[str, Any]:
            finish, matched = _finish(out)
            meta = out["meta_info"]
            return {
                "index": i,
                "text": (echo[i // req.n] if echo else "") + out["text"],
                "logprobs": logprobs(meta.get("output_token_logprobs", []), meta.get("output_top_logprobs")),
                "finish_reason": finish,
                "matched_stop": matched,
            }

        if not req.stream:
            return await answer(items, request, head, choice, req.n)
        include_usage, continuous = usage_options(req)
        sent = [_Sent() for _ in items]

        def chunks(i: int, out: dict[str, Any]) -> list[dict[str, Any]]:
            s = sent[i]
            delta, triples, top = s.advance(out)
            if echo and not s.started:
                delta = echo[i // req.n] + delta
            s.started = True
            finish, matched = _finish(out)
            if not (delta or triples or finish):
                return []
            s.logprobs += len(triples)
            body = {"index": i, "text": delta, "logprobs": logprobs(triples, top)}
            body |= {"finish_reason": finish, "matched_stop": matched}
            return [
                {
                    **head,
                    "choices": [body],
                    "usage": usage(s.prompt_tokens, s.completion_tokens) if continuous else None,
                }
            ]

        def tail() -> list[dict[str, Any]]:
            if not include_usage:
                return []
            prompt = {i: s.prompt_tokens for i, s in enumerate(sent)}
            completion = {i: s.completion_tokens for i, s in enumerate(sent)}
            return [{**head, "choices": [], "usage": stream_usage(prompt, completion, req.n)}]

        return stream(items, chunks, tail)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
        rid = req.rid if req.rid is not None else f"chatcmpl-{uuid.uuid4().hex}"
        try:
            req.refuse(CHAT_REFUSED)
            _text_only(req)
            text = engine.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in req.messages],
                add_generation_prompt=True,
                tokenize=False,
                **_template_kwargs(engine.tokenizer, req.template_kwargs()),
            )
            input_ids = list(engine.tokenizer.encode(check_text(text, "messages"), add_special_tokens=False))
            items = prepare(req, req.to_generate(input_ids, rid, model_defaults))
        except (ValueError, TemplateError) as e:  # TemplateError: the template refused the messages
            return _openai_error(str(e))
        head = {
            "id": rid if isinstance(rid, str) else rid[0],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model or engine.served_model_name,
        }

        def choice(i: int, out: dict[str, Any]) -> dict[str, Any]:
            finish, matched = _finish(out)
            meta = out["meta_info"]
            triples, top = meta.get("output_token_logprobs", []), meta.get("output_top_logprobs")
            return {
                "index": i,
                "message": {"role": "assistant", "content": out["text"], "reasoning_content": None},
                "logprobs": chat_logprobs(names, triples, top) if req.logprobs else None,
                "finish_reason": finish,
                "matched_stop": matched,
            }

        if not req.stream:
            return await answer(items, request, head, choice, req.n)
        include_usage, continuous = usage_options(req)
        sent = [_Sent() for _ in items]
        finished: dict[int, tuple[str | None, Any, list[Any], list[Any]]] = {}
        chunk_head = {**head, "object": "chat.completion.chunk"}

        def chunk(
            i: int, delta: dict[str, Any], triples: list[Any], top: list[Any], finish: Any = None, matched: Any = None
        ) -> Any:
            """serving_chat.py's chunk; logprob entries of steps that added no text ride on the next chunk."""
            s = sent[i]
            s.logprobs += len(triples)
            body = {"index": i, "delta": {"reasoning_content": None, **delta}}
            body |= {"logprobs": chat_logprobs(names, triples, top) if req.logprobs and triples else None}
            body |= {"finish_reason": finish, "matched_stop": matched}
            extra = (
                {"usage": usage(s.prompt_tokens, s.completion_tokens)} if continuous and delta.get("content") else {}
            )
            return {**chunk_head, "choices": [body], **extra}

        def chunks(i: int, out: dict[str, Any]) -> list[dict[str, Any]]:
            s = sent[i]
            delta, triples, top = s.advance(out)
            sends = [] if s.started else [chunk(i, {"role": "assistant", "content": ""}, [], [])]
            s.started = True
            if delta:
                sends.append(chunk(i, {"content": delta}, triples, top))
                triples, top = [], []
            if out["meta_info"]["finish_reason"] is not None:
                finished[i] = (*_finish(out), triples, top)
            return sends

        def tail() -> list[dict[str, Any]]:
            # SGLang sends each choice's finish after the last output (with logprobs no text chunk carried here)
            done = [chunk(i, {}, tr, top, finish, matched) for i, (finish, matched, tr, top) in finished.items()]
            if include_usage:
                prompt = {i: s.prompt_tokens for i, s in enumerate(sent)}
                completion = {i: s.completion_tokens for i, s in enumerate(sent)}
                done.append({**chunk_head, "choices": [], "usage": stream_usage(prompt, completion, req.n)})
            return done

        return stream(items, chunks, tail)
