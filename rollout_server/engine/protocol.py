"""Request bodies of SGLang's native HTTP API (python/sglang/srt/managers/io_struct.py): names and defaults.

Unknown top-level fields are ignored, as SGLang's dataclass bodies ignore them; fields this engine
cannot honour are rejected with 400 when set to a non-neutral value.

The OpenAPI schema is stricter than the validation where the engine's own checks give the better message
(`WithJsonSchema`): it documents what the engine accepts (the sampling parameters, token ids >= 0, null
for unsupported fields), so clients and the fuzzer (experiments/fuzz.py) see the real contract, while a bad
value still gets the engine's reason naming the key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from rollout_server.engine.top_logprobs import MAX_TOP_LOGPROBS_NUM

# top logprobs per position: 0 none (SGLang reads <= 0 as none); above the vocabulary refused too (items.py)
_TOP_NUM = {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS_NUM}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingParamsSchema(BaseModel):
    """JSON schema of `sampling_params` (validated by sampling.SamplingParams.from_dict, which names the bad key)."""

    model_config = ConfigDict(extra="forbid", title="SamplingParams")

    max_new_tokens: int | None = Field(128, ge=-1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Annotated[int, WithJsonSchema({"anyOf": [{"const": -1}, {"type": "integer", "minimum": 1}]})] = -1
    min_p: float = Field(0.0, ge=0, le=1)
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = Field(1, ge=1)
    sampling_seed: int | None = Field(None, ge=-(2**63), lt=2**63)


_SAMPLING = SamplingParamsSchema.model_json_schema()
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_UNSUPPORTED = WithJsonSchema({"type": "null", "description": "not supported by the built-in engine"})


class GenerateReqInput(_Body):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["input_ids"]}]},
    )

    text: Annotated[
        str | list[str] | None,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}),
    ] = None
    input_ids: Annotated[
        list[StrictInt] | list[list[StrictInt]] | None,
        WithJsonSchema({"anyOf": [_IDS, {"type": "array", "items": _IDS, "minItems": 1}]}),
    ] = None
    sampling_params: Annotated[
        dict[str, Any] | list[dict[str, Any]] | None,
        WithJsonSchema({"anyOf": [_SAMPLING, {"type": "array", "items": _SAMPLING}, {"type": "null"}]}),
    ] = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: Annotated[int, Field(ge=-1)] | list[Annotated[int, Field(ge=-1)]] | None = None
    top_logprobs_num: Annotated[
        int | list[int] | None,
        WithJsonSchema({"anyOf": [_TOP_NUM, {"type": "array", "items": _TOP_NUM}, {"type": "null"}]}),
    ] = None
    token_ids_logprob: Annotated[list[int] | list[list[int]] | None, _UNSUPPORTED] = None
    return_text_in_logprobs: bool = False
    return_routed_experts: bool | list[bool] = False
    """MoE models: meta_info.routed_experts of the final output, base64 of int32 [prompt + output tokens - 1,
    moe_layers, topk] (SGLang 0.5.23; the experts each token was routed to, for rollout routing replay)."""
    stream: bool = False
    rid: str | list[str] | None = None
    input_embeds: Annotated[Any, _UNSUPPORTED] = None
    image_data: Annotated[Any, _UNSUPPORTED] = None
    video_data: Annotated[Any, _UNSUPPORTED] = None
    audio_data: Annotated[Any, _UNSUPPORTED] = None
    lora_path: Annotated[Any, _UNSUPPORTED] = None
    return_hidden_states: Annotated[bool | list[bool], WithJsonSchema({"const": False})] = False


class AbortReq(_Body):
    rid: str = ""
    abort_all: bool = False


class PauseGenerationReqInput(_Body):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReqInput(_Body):
    torch_empty_cache: bool = True


class UpdateWeightVersionReqInput(_Body):
    new_version: str
    abort_all_requests: bool = True


class InitWeightsUpdateGroupReqInput(_Body):
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1, lt=2**16)
    world_size: int = Field(ge=2, le=2**16)  # torch's store takes a C int: a huge value would be a TypeError
    group_name: str = "weight_update_group"
    backend: Annotated[str, WithJsonSchema({"enum": ["gloo", "nccl"]})] = "nccl"


class BeginWeightUpdateReqInput(_Body):
    """Open a weight-update session (SGLang >= 0.5.23): distributed updates are refused outside one."""

    selector: Literal["target", "draft", "all"] = "all"


class EndWeightUpdateReqInput(_Body):
    """Close the weight-update session."""


class DestroyWeightsUpdateGroupReqInput(_Body):
    group_name: str = "weight_update_group"


class UpdateWeightsFromDistributedReqInput(_Body):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[Annotated[int, Field(lt=2**62)]]]  # the engine names negative ones; huge ones overflow torch
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    torch_empty_cache: bool = False


class UpdateWeightFromDiskReqInput(_Body):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True
    keep_pause: bool = False
