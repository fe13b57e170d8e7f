"""The paper's three models against their shipped learner recipes: the learner's HF import reads each model's
config.json (its published values, written here: no hub) and the recipe's layout fits it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import Qwen3Config, Qwen3MoeConfig

from common.config import load_config
from learner.model.hf_config import check_parallel_fit, read_hf_arch
from learner.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[2]

# The fields of each model's published config.json that the learner reads.
QWEN3_4B_THINKING_2507: dict[str, Any] = {
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
    "rope_theta": 5000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}  # fmt: skip
DEEPSEEK_R1_0528_QWEN3_8B: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 131072,
    "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                     "attn_factor": 0.8782488562869419},
}  # fmt: skip
QWEN3_30B_A3B_THINKING_2507: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 262144, "rope_theta": 10000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
}  # fmt: skip


def _config(values: dict[str, Any]) -> Any:
    values = dict(values)
    rope_scaling = values.pop("rope_scaling", None)
    config = (Qwen3MoeConfig if "num_experts" in values else Qwen3Config)(**values)
    if rope_scaling is not None:  # transformers 5 keeps theta and scaling in rope_parameters
        config.rope_parameters = {"rope_theta": values["rope_theta"], **rope_scaling}
    return config


@pytest.mark.parametrize(
    ("recipe", "values"),
    [
        ("qwen3-4b-thinking-2507/learner.toml", QWEN3_4B_THINKING_2507),
        ("qwen3-4b-thinking-2507/learner-64k.toml", QWEN3_4B_THINKING_2507),
        ("deepseek-r1-0528-qwen3-8b/learner.toml", DEEPSEEK_R1_0528_QWEN3_8B),
        ("qwen3-30b-a3b-thinking-2507/learner.toml", QWEN3_30B_A3B_THINKING_2507),
    ],
)
def test_each_recipe_accepts_its_model_and_fits_its_layout(recipe: str, values: dict[str, Any]) -> None:
    """Guards against a shipped recipe that the learner refuses at start on the real model (the 8B's YaRN block,
    the 30B's MoE: both were refused before), or whose TP / PP / EP does not divide the model's heads, layers or
    experts, found only after a cluster is allocated."""
    cfg = load_config(TrainConfig, REPO / "configs" / "models" / recipe)
    arch = read_hf_arch(_config(values))
    check_parallel_fit(arch, cfg.model)
    if "rope_scaling" in values:
        assert arch.rope_scaling is not None and arch.rope_scaling.rope_type == "yarn"
    if "num_experts" in values:
        assert arch.moe is not None and (arch.moe.num_experts, arch.moe.topk) == (128, 8)
        assert cfg.model.ep_size > 1
