"""Request bodies of the OpenAI-compatible API (SGLang's srt/entrypoints/openai/protocol.py: names, types, defaults)
and their translation into a native `GenerateReqInput`, the way SGLang's serving_completions.py / serving_chat.py
translate them.

What SGLang implements and this engine does not is refused with a 400 naming the field, through the one rule of the
native path (sampling.UnsupportedField): SGLang's sampling fields (frequency_penalty, logit_bias, response_format, ...)
travel into `sampling_params` exactly as SGLang sends them and are refused there; top logprobs travel as
`top_logprobs_num` (bounded by items.py); fields SGLang's OpenAI server reads itself (tools, return_token_ids,
...) are refused here against `*_REFUSED`. Fields SGLang accepts and ignores (user, best_of, priority, routing
hints) are ignored here too, as are fields neither knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from rollout_server.engine.protocol import GenerateReqInput
from rollout_server.engine.sampling import UnsupportedField, refuse_unsupported
from rollout_server.engine.top_logprobs import MAX_TOP_LOGPROBS_NUM

# Documents the neutral value as the only one accepted (the fuzzer's positive cases stay valid requests).
_NEUTRAL_NULL = WithJsonSchema({"type": "null", "description": "not supported by the built-in engine"})
_TOP_NUM_OR_NULL = WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS_NUM}, {"type": "null"}]}
)


def _neutral(value: Any) -> Any:
    return WithJsonSchema(
        {"const": value, "description": "only the neutral value: not supported by the built-in engine"}
    )


# SGLang's own OpenAI-layer fields (not sampling parameters) this engine does not implement: neutral values.
COMPLETION_REFUSED: dict[str, Any] = {
    "return_token_ids": False,
    "return_routed_experts": False,
    "custom_logit_processor": None,
    "session_id": None,
    "session_params": None,
}
CHAT_REFUSED: dict[str, Any] = {
    **COMPLETION_REFUSED,
    "tools": None,
    "return_prompt_token_ids": False,
    "return_meta_info": False,
    "return_input_ids_in_sglext": False,
    "return_output_ids_in_sglext": False,
    "return_sampling_mask": False,
    "sampling_logprobs_mode": None,
    "return_flat_raw_output_top_logprobs": False,
    "continue_final_message": False,
    "input_ids": None,
    "reasoning": None,
}
# The chat sampling fields SGLang takes from the model's generation_config.json when a request leaves them out
# (its default --sampling-defaults model; configs/model_config.py get_default_sampling_params), else these.
CHAT_SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


def model_sampling_defaults(model_path: str) -> dict[str, Any]:
    """The chat sampling defaults a model's generation_config.json sets (only keys it sets, as SGLang reads them)."""
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {k: config[k] for k in CHAT_SAMPLING_DEFAULTS if config.get(k) is not None}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ContentPart(BaseModel):
    """One part of a message's list-form content; only text parts: the engine's models read text only."""

    model_config = ConfigDict(extra="ignore")
    type: Annotated[str, WithJsonSchema({"enum": ["text"]})]  # another type gets a 400 naming it
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class _OpenAIRequest(BaseModel):
    """The fields completions and chat share. `extra="allow"`: the `*_REFUSED` fields are read from the extras."""

    model_config = ConfigDict(extra="allow")
    model: str = ""
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    rid: str | list[str] | None = None
    # SGLang sampling fields without an implementation here (refused by the native rule unless neutral)
    frequency_penalty: Annotated[float, _neutral(0)] = 0.0
    presence_penalty: Annotated[float, _neutral(0)] = 0.0
    min_tokens: Annotated[int, _neutral(0)] = 0
    logit_bias: Annotated[dict[str, float] | None, _NEUTRAL_NULL] = None
    regex: Annotated[str | None, _NEUTRAL_NULL] = None
    ebnf: Annotated[str | None, _NEUTRAL_NULL] = None
    stop_regex: Annotated[str | list[str] | None, _NEUTRAL_NULL] = None
    custom_params: Annotated[dict[str, Any] | None, _NEUTRAL_NULL] = None
    watermark: Annotated[dict[str, Any] | None, _NEUTRAL_NULL] = None
    response_format: Annotated[dict[str, Any] | None, _NEUTRAL_NULL] = None
    return_hidden_states: Annotated[bool | Literal["last"], _neutral(False)] = False
    lora_path: Annotated[str | list[str | None] | None, _NEUTRAL_NULL] = None

    def sampling_params(self, max_new_tokens: int | None, sampling: dict[str, Any]) -> dict[str, Any]:
        """The native sampling_params SGLang builds from this request (`sampling`: temperature .. repetition_penalty)."""
        params = {
            **sampling,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "stop_regex": self.stop_regex,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "regex": self.regex,
            "ebnf": self.ebnf,
            "n": self.n,
            "no_stop_trim": self.no_stop_trim,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "logit_bias": self.logit_bias,
            "custom_params": self.custom_params,
            "sampling_seed": self.seed,
            "watermark": self.watermark,
        }
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":  # SGLang turns it into a grammar: json_schema, or structural_tag
            params["structural_tag" if kind == "structural_tag" else "json_schema"] = json.dumps(self.response_format)
        return params

    def refuse(self, refused: dict[str, Any]) -> None:
        """UnsupportedField for a field of `refused` (SGLang's OpenAI-layer features) set to a non-neutral value."""
        refuse_unsupported(self.model_extra or {}, refused)

    def client_name(self, e: UnsupportedField) -> str:
        """The field of this request a refusal is about (the native rule names SGLang's native field)."""
        name = {"min_new_tokens": "min_tokens"}.get(e.key, e.key)
        if e.key in ("json_schema", "structural_tag") and self.response_format is not None:
            name = "response_format"
        return name

    def refusal(self, e: UnsupportedField) -> str:
        """The reason of a refusal, naming the field and value this request sent."""
        name = self.client_name(e)
        sent = getattr(self, name, None)
        if sent is None:  # not sent: a default SGLang takes from the model (chat's repetition_penalty)
            return (
                f"{name}={e.value!r} (the model's generation_config.json default) is not supported by the built-in "
                f"engine; send {name} with its neutral value to go without"
            )
        return str(UnsupportedField(name, sent))


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, gt=0)  # OpenAI's default; SGLang refuses 0 ("max_tokens must be positive")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: Annotated[float, _neutral(1)] = 1.0
    echo: bool = False
    # top logprobs per token; 0: the sampled token's only
    logprobs: Annotated[Annotated[int, Field(ge=0)] | None, _TOP_NUM_OR_NULL] = None
    json_schema: Annotated[str | None, _NEUTRAL_NULL] = None

    def to_generate(self, rid: str | list[str]) -> GenerateReqInput:
        """serving_completions.py `_convert_to_internal_request`."""
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}
        params = self.sampling_params(self.max_tokens, sampling)
        params["repetition_penalty"] = self.repetition_penalty
        if self.json_schema is not None and "json_schema" not in params:
            params["json_schema"] = self.json_schema
        prompt = self.prompt
        is_text = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], str))
        return GenerateReqInput(
            text=prompt if is_text else None,
            input_ids=None if is_text else prompt,
            sampling_params=params,
            return_logprob=self.logprobs is not None,
            top_logprobs_num=self.logprobs or 0,
            logprob_start_len=0 if self.echo and self.logprobs else -1,
            return_text_in_logprobs=True,
            stream=self.stream,
            rid=rid,
            lora_path=self.lora_path,
            return_hidden_states=bool(self.return_hidden_states),
        )

    def client_name(self, e: UnsupportedField) -> str:
        return "logprobs" if e.key == "top_logprobs_num" else super().client_name(e)


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "ultra", "max"]


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    # None: the model's generation_config.json default, else OpenAI's (CHAT_SAMPLING_DEFAULTS)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: Annotated[float | None, WithJsonSchema({"anyOf": [{"const": 1}, {"type": "null"}]})] = None
    logprobs: bool = False
    top_logprobs: Annotated[Annotated[int, Field(ge=0)] | None, _TOP_NUM_OR_NULL] = None
    tool_choice: Annotated[str | dict[str, Any] | None, WithJsonSchema({"enum": ["none", "auto", None]})] = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | Annotated[float, Field(ge=0.0, le=0.99, allow_inf_nan=False)] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        """`chat_template_kwargs` with SGLang's reading of `reasoning_effort`: the template gets it, and thinking is
        on unless it is "none" (protocol.py `normalize_reasoning_inputs`, serving_chat.py; explicit kwargs win)."""
        kwargs = dict(self.chat_template_kwargs or {})
        effort = self.reasoning_effort
        if effort is None:
            return kwargs
        kwargs.setdefault("thinking", effort != "none")
        kwargs.setdefault("enable_thinking", effort != "none")
        return {"reasoning_effort": effort, **kwargs}

    def refuse(self, refused: dict[str, Any]) -> None:
        super().refuse(refused)
        # "required" or a named tool needs tools; SGLang refuses it without them too (serving_chat.py)
        if self.tool_choice not in (None, "none", "auto"):
            raise UnsupportedField("tool_choice", self.tool_choice)

    def to_generate(
        self, input_ids: list[int], rid: str | list[str], model_defaults: dict[str, Any]
    ) -> GenerateReqInput:
        """serving_chat.py `_convert_to_internal_request` with protocol.py `to_sampling_params`: a field the request
        leaves out takes the model's default, then OpenAI's."""
        sampling = {
            name: value if (value := getattr(self, name)) is not None else model_defaults.get(name, default)
            for name, default in CHAT_SAMPLING_DEFAULTS.items()
        }
        max_tokens = self.max_completion_tokens or self.max_tokens  # SGLang's `or`: 0 means "not given"
        return GenerateReqInput(
            input_ids=input_ids,
            sampling_params=self.sampling_params(max_tokens, sampling),
            return_logprob=self.logprobs,
            top_logprobs_num=self.top_logprobs or 0,
            logprob_start_len=-1,
            return_text_in_logprobs=True,
            stream=self.stream,
            rid=rid,
            lora_path=self.lora_path,
            return_hidden_states=bool(self.return_hidden_states),
        )

    def client_name(self, e: UnsupportedField) -> str:
        return "top_logprobs" if e.key == "top_logprobs_num" else super().client_name(e)
