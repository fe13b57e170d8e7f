"""What the built-in engine answers on SGLang's info endpoints (/get_model_info, /get_server_info), in SGLang's
shapes: the weight version as SGLang reports it, the context limits, the layout (one rank: the learner's
weights/sglang_release.py `engine_ranks` reads 1), the NCCL release a weight-update group would use (SGLang reports
none) and the scheduler's state."""

from __future__ import annotations

from typing import Any

from rollout_server.engine.engine import Engine
from weights.group import nccl_version

ENGINE_VERSION = "longtrace-builtin-0.1"


def model_info(engine: Engine) -> dict[str, Any]:
    runner, config = engine.runner, engine.config
    return {
        "model_path": runner.model_path,
        "tokenizer_path": config.tokenizer_path or config.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": engine.weight_version,
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": runner.config.model_type,
        "architectures": getattr(runner.config, "architectures", None),
    }


async def server_info(engine: Engine) -> dict[str, Any]:
    load = await engine.load()
    scheduler, context_length = engine.scheduler, engine.context_length
    return {
        **engine.config.model_dump(mode="json", exclude={"broker"}),
        "weight_version": engine.weight_version,
        "context_length": context_length,
        "max_total_num_tokens": engine.runner.cache.num_slots * context_length,
        "max_req_input_len": context_length - 1,
        "tp_size": 1,
        "pp_size": 1,
        "dp_size": 1,
        "nccl_version": nccl_version(),
        "internal_states": [
            {
                **load,
                "paused": scheduler.paused,
                "num_steps": scheduler.num_steps,
                "num_generated_tokens": scheduler.num_generated,
                "max_decode_batch": scheduler.max_decode_batch,
            }
        ],
        "version": ENGINE_VERSION,
    }
