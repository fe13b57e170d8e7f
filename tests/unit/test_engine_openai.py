"""The built-in engine's OpenAI-compatible API over real HTTP (BackgroundServer), checked against SGLang's shapes
(srt/entrypoints/openai/) and against the engine's own native /generate answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout_server.engine.api import build_app
from rollout_server.engine.config import EngineConfig
from rollout_server.engine.engine import Engine
from rollout_server.engine.server import BackgroundServer
from rollout_server.models import init_tiny_model

PROMPT_IDS = [11, 42, 7, 300, 5, 9]
USER = [{"role": "user", "content": "Is the answer correct?"}]


def _serve(model: Path) -> Iterator[tuple[Engine, str]]:
    engine = Engine(EngineConfig(model_path=str(model), max_running_requests=8, context_length=256, num_threads=1))
    engine.start()
    try:
        with BackgroundServer(build_app(engine)) as server:
            yield engine, server.url
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, str]]:
    yield from _serve(init_tiny_model(tmp_path_factory.mktemp("engine-openai") / "m"))


@pytest.fixture(scope="module")
def url(served: tuple[Engine, str]) -> str:
    return served[1]


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def _ok(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = _post(url, path, body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _refused(url: str, path: str, body: dict[str, Any]) -> str:
    r = _post(url, path, body)
    assert r.status_code == 400, r.text
    message: str = r.json()["message"] if "message" in r.json() else r.json()["error"]["message"]
    return message


def _events(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = _post(url, path, {**body, "stream": True})
    assert r.status_code == 200, r.text
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def test_completions_logprobs_integer_are_the_native_logprobs(url: str) -> None:
    """Guards against `logprobs` (an integer on /v1/completions) being dropped or mis-mapped: the legacy LogProbs
    must carry the engine's own token logprobs (those /generate returns), with SGLang's -1 text offsets and no top-k
    rows for logprobs=0; logprobs=null must answer without logprobs."""
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    native = _ok(url, "/generate", {"input_ids": PROMPT_IDS, "sampling_params": params, "return_logprob": True})
    body = {"prompt": PROMPT_IDS, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    out = _ok(url, "/v1/completions", {**body, "logprobs": 0})
    logprobs = out["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [t[0] for t in native["meta_info"]["output_token_logprobs"]]
    assert len(logprobs["tokens"]) == 5 and logprobs["text_offset"] == [-1] * 5 and logprobs["top_logprobs"] == []
    assert out["choices"][0]["text"] == native["text"]
    assert _ok(url, "/v1/completions", body)["choices"][0]["logprobs"] is None


def test_completions_top_logprobs_are_the_native_rows(url: str) -> None:
    """Guards against completions' `logprobs` > 0 being refused, dropped or mis-mapped: each position's
    `top_logprobs` dict (token text -> logprob, as SGLang's `to_openai_style_logprobs`) must hold the native
    /generate output_top_logprobs of that position, and a stream must carry the same rows, each once."""
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    native = _ok(
        url,
        "/generate",
        {
            "input_ids": PROMPT_IDS,
            "sampling_params": params,
            "return_logprob": True,
            "top_logprobs_num": 3,
            "return_text_in_logprobs": True,
        },
    )
    body = {"prompt": PROMPT_IDS, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    top = _ok(url, "/v1/completions", body)["choices"][0]["logprobs"]["top_logprobs"]
    rows = native["meta_info"]["output_top_logprobs"]
    assert len(top) == len(rows) == 5
    for got, row in zip(top, rows, strict=True):
        assert 1 <= len(got) <= 3 and set(got.values()) <= {lp for lp, _, _ in row}
        assert {text: lp for lp, _, text in row if "\ufffd" not in text}.items() <= got.items()
    streamed = [c["choices"][0]["logprobs"] for c in _events(url, "/v1/completions", body) if c["choices"]]
    assert [row for lp in streamed if lp for row in lp["top_logprobs"]] == top


def test_chat_top_logprobs_carry_tokens_bytes_and_logprobs(url: str) -> None:
    """Guards against chat's `top_logprobs` being refused or left empty: every content entry carries top_logprobs
    TopLogprob entries ({token, bytes, logprob}, sorted, the greedy token first with its own logprob), and the
    stream carries the same entries as the answer."""
    body = {"messages": USER, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    content = _ok(url, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert content
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 2 and all(set(t) == {"token", "bytes", "logprob"} for t in top)
        assert top[0]["logprob"] >= top[1]["logprob"]
        assert (top[0]["token"], top[0]["bytes"], top[0]["logprob"]) == (
            entry["token"],
            entry["bytes"],
            entry["logprob"],
        )
    chunks = _events(url, "/v1/chat/completions", body)
    streamed = [
        e
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == content


def test_top_logprobs_bound_is_named_by_the_field_sent(url: str) -> None:
    """Guards against a k beyond what the engine serves being answered (a huge reply) or refused naming a field the
    client never sent: native top_logprobs_num, completions' logprobs and chat's top_logprobs each get a 400 naming
    their own field."""
    native = _refused(url, "/generate", {"input_ids": PROMPT_IDS, "return_logprob": True, "top_logprobs_num": 9999})
    assert native.startswith("top_logprobs_num must be at most ")
    msg = _refused(url, "/v1/completions", {"prompt": "The river", "max_tokens": 2, "logprobs": 9999})
    assert msg.startswith("logprobs must be at most ") and msg.endswith("got 9999")
    msg = _refused(url, "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 9999})
    assert msg.startswith("top_logprobs must be at most ")


# (OpenAI field, value, the native sampling parameter SGLang turns it into, its value there)
SAMPLING_REFUSALS = [
    ("frequency_penalty", 0.5, "frequency_penalty", 0.5),
    ("presence_penalty", -0.5, "presence_penalty", -0.5),
    ("min_tokens", 2, "min_new_tokens", 2),
    ("logit_bias", {"5": 3.0}, "logit_bias", {"5": 3.0}),
    ("regex", "[0-9]+", "regex", "[0-9]+"),
    ("stop_regex", "x+", "stop_regex", "x+"),
    ("response_format", {"type": "json_object"}, "json_schema", '{"type": "object"}'),
]


@pytest.mark.parametrize(("field", "value", "native_key", "native_value"), SAMPLING_REFUSALS)
def test_unsupported_sampling_fields_get_a_400_naming_them_on_native_and_openai(
    url: str, field: str, value: Any, native_key: str, native_value: Any
) -> None:
    """Guards against the OpenAI path silently dropping a field the engine cannot honour (it once answered
    frequency_penalty, logit_bias, response_format as if unset): the same refusal as the native path, naming the
    field as the client sent it."""
    reason = "is not supported by the built-in engine"
    native = _refused(url, "/generate", {"input_ids": PROMPT_IDS, "sampling_params": {native_key: native_value}})
    assert native == f"sampling_params.{native_key}={native_value!r} {reason}"
    completion = _refused(url, "/v1/completions", {"prompt": "The river", "max_tokens": 2, field: value})
    assert completion == f"{field}={value!r} {reason}"
    assert _refused(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, field: value}) == completion


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("/v1/chat/completions", "continue_final_message", True),
        ("/v1/completions", "return_token_ids", True),
        ("/v1/chat/completions", "return_hidden_states", True),
        ("/v1/completions", "lora_path", "adapter"),
    ],
)
def test_unsupported_openai_fields_get_a_400_naming_them(url: str, path: str, field: str, value: Any) -> None:
    """Guards against SGLang features of the OpenAI layer (tools, token ids, hidden states, LoRA) being ignored: a
    client asking for them would get an answer without them and no sign why."""
    body = {"prompt": "The river"} if path == "/v1/completions" else {"messages": USER}
    message = _refused(url, path, {**body, "max_tokens": 2, field: value})
    assert message.startswith(f"{field}=") and message.endswith("is not supported by the built-in engine")


def test_neutral_values_of_unsupported_fields_are_accepted(url: str) -> None:
    """Guards against the refusal catching what OpenAI clients send by default (zero penalties, an empty
    logit_bias, a text response_format, tool_choice none, no tools) and so refusing ordinary requests."""
    neutral = {
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "min_tokens": 0,
        "tools": [],
        "tool_choice": "none",
        "user": "someone",  # accepted and ignored, as SGLang does
    }
    out = _ok(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, **neutral})
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert "tool_choice" in _refused(url, "/v1/chat/completions", {"messages": USER, "tool_choice": "required"})


def test_image_content_parts_are_refused(url: str) -> None:
    """Guards against a multimodal message part being dropped from the prompt while the model answers anyway."""
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    message = _refused(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})
    assert message == "messages[0].content[1].type='image_url' is not supported by the built-in engine"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_include_usage_sends_the_usage_of_the_whole_answer(url: str, path: str) -> None:
    """Guards against stream_options.include_usage being dropped: the last chunk before [DONE] must carry the same
    usage as the non-streamed answer (each prompt's tokens once for n choices), and continuous_usage_stats must put
    each choice's running usage on its chunks; without stream_options no usage chunk is sent."""
    prompt = {"prompt": "The river"} if path == "/v1/completions" else {"messages": USER}
    body = {**prompt, "max_tokens": 4, "n": 2, "temperature": 0, "ignore_eos": True}
    plain = _ok(url, path, body)["usage"]
    assert plain["prompt_tokens"] == _ok(url, path, {**body, "n": 1})["usage"]["prompt_tokens"]  # counted once
    assert plain["completion_tokens"] == 8
    events = _events(url, path, {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    last = events[-1]
    assert last["choices"] == [] and last["usage"] == {k: v for k, v in plain.items() if v is not None}
    running = [e["usage"]["completion_tokens"] for e in events[:-1] if e["choices"][0]["index"] == 0 and e.get("usage")]
    assert running == sorted(set(running)) and 1 <= running[0] and running[-1] <= 4, running
    assert all(e.get("usage") is None for e in _events(url, path, body))


def test_chat_stream_deltas_and_logprobs_add_up_to_the_answer(url: str) -> None:
    """Guards against a streamed answer that differs from the non-streamed one: a character split across tokens
    once went out as U+FFFD and was never corrected (SGLang's detokenizer holds an incomplete character back), and
    logprobs of a step without new text must not be lost."""
    for seed in range(6):  # random tiny-model text, split characters among it
        body = {"messages": USER, "max_tokens": 24, "seed": seed, "ignore_eos": True, "logprobs": True}
        full = _ok(url, "/v1/chat/completions", body)["choices"][0]
        events = _events(url, "/v1/chat/completions", body)
        deltas = [e["choices"][0] for e in events]
        assert deltas[0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
        assert "".join(d["delta"].get("content") or "" for d in deltas) == full["message"]["content"], seed
        streamed = [t for d in deltas if d["logprobs"] for t in d["logprobs"]["content"]]
        assert streamed == full["logprobs"]["content"]
        assert deltas[-1]["finish_reason"] == full["finish_reason"] == "length"


def test_completion_stream_text_adds_up_with_echo(served: tuple[Engine, str]) -> None:
    """Guards against echo being ignored (SGLang prepends the prompt) and against a streamed text that differs
    from the non-streamed one."""
    engine, url = served
    for seed in range(3):
        body = {"prompt": "The river", "max_tokens": 16, "seed": seed, "echo": True, "logprobs": 0}
        full = _ok(url, "/v1/completions", body)["choices"][0]
        assert full["text"].startswith("The river") and len(full["logprobs"]["tokens"]) == 16
        chunks = [e["choices"][0] for e in _events(url, "/v1/completions", body)]
        assert "".join(c["text"] for c in chunks) == full["text"]
        assert [lp for c in chunks for lp in c["logprobs"]["token_logprobs"]] == full["logprobs"]["token_logprobs"]
    out = _ok(url, "/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 2, "echo": True})
    assert out["choices"][0]["text"].startswith(engine.tokenizer.decode(PROMPT_IDS, skip_special_tokens=True))


def test_answers_carry_the_weight_version_as_metadata(served: tuple[Engine, str]) -> None:
    """Guards against an OpenAI answer that does not say which weights produced it (SGLang's
    `metadata.weight_version`), e.g. a judge or eval that must not mix policy versions."""
    engine, url = served
    r = _post(url, "/update_weight_version", {"new_version": "7", "abort_all_requests": False})
    assert r.status_code == 200
    try:
        for path, prompt in (
            ("/v1/completions", {"prompt": "The river"}),
            ("/v1/chat/completions", {"messages": USER}),
        ):
            out = _ok(url, path, {**prompt, "max_tokens": 2})
            assert out["metadata"]["weight_version"] == "7", out
    finally:
        _post(url, "/update_weight_version", {"new_version": "default", "abort_all_requests": False})
    assert engine.weight_version == "default"


def test_model_retrieve_by_id_and_unknown_model(served: tuple[Engine, str]) -> None:
    """Guards against GET /v1/models/{id} being missing (clients check the model before use) or answering an
    unknown id with anything but SGLang's 404 naming it; the served name is a path with slashes."""
    engine, url = served
    listed = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert listed["id"] == engine.served_model_name and "/" in listed["id"]  # a model path: several segments
    card = httpx.get(f"{url}/v1/models/{engine.served_model_name}", timeout=10)
    assert card.status_code == 200, card.text and {**card.json(), "created": 0} == {**listed, "created": 0}
    assert listed["owned_by"] == "sglang" and listed["max_model_len"] == 256 and listed["parent"] is None
    r = httpx.get(f"{url}/v1/models/no-such-model", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model 'no-such-model' does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_reasoning_effort_reaches_the_chat_template(url: str) -> None:
    """Guards against reasoning_effort being ignored: SGLang turns "none" into enable_thinking=False for the
    template (our tiny template then closes the think block: more prompt tokens), as chat_template_kwargs would."""
    default = _ok(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 1})["usage"]["prompt_tokens"]
    off = _ok(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 1, "reasoning_effort": "none"})
    kwargs = {"messages": USER, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}}
    assert off["usage"]["prompt_tokens"] == _ok(url, "/v1/chat/completions", kwargs)["usage"]["prompt_tokens"]
    assert off["usage"]["prompt_tokens"] > default
    high = _ok(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 1, "reasoning_effort": "high"})
    assert high["usage"]["prompt_tokens"] == default


def test_rid_is_the_answer_id(url: str) -> None:
    """Guards against a client's rid being dropped (SGLang's answer id is the engine request id, which
    /abort_request takes)."""
    assert _ok(url, "/v1/completions", {"prompt": "The river", "max_tokens": 1, "rid": "judge-1"})["id"] == "judge-1"
    assert _ok(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 1, "rid": "judge-2"})["id"] == "judge-2"


@pytest.fixture(scope="module")
def with_defaults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An engine whose model's generation_config.json sets sampling defaults: greedy, and a repetition penalty."""
    model = init_tiny_model(tmp_path_factory.mktemp("engine-openai-defaults") / "m")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "repetition_penalty": 1.2}))
    for _, url in _serve(model):
        yield url


def test_chat_takes_sampling_defaults_from_the_models_generation_config(with_defaults: str) -> None:
    """Guards against chat sampling with OpenAI's defaults where SGLang (its default --sampling-defaults model)
    uses the model's generation_config.json: temperature 0 there means greedy when the request sets none; a default
    the engine cannot honour (repetition_penalty) is refused, naming it, until the request overrides it."""
    url = with_defaults
    message = _refused(url, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert message.startswith("repetition_penalty=1.2 (the model's generation_config.json default)")
    body = {"messages": USER, "max_tokens": 8, "ignore_eos": True, "repetition_penalty": 1.0, "logprobs": True}
    greedy = _ok(url, "/v1/chat/completions", {**body, "temperature": 0})["choices"][0]
    for seed in range(3):
        default = _ok(url, "/v1/chat/completions", {**body, "seed": seed})["choices"][0]
        assert default["message"] == greedy["message"] and default["logprobs"] == greedy["logprobs"]
    sampled = [_ok(url, "/v1/chat/completions", {**body, "seed": s, "temperature": 1.0}) for s in range(3)]
    assert any(s["choices"][0]["message"] != greedy["message"] for s in sampled)
    # completions keep OpenAI's defaults, as SGLang's do: no generation_config there
    assert _ok(url, "/v1/completions", {"prompt": "The river", "max_tokens": 2})["choices"][0]["finish_reason"]
