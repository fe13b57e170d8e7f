"""RoPE scaling in the learner's HF config mapping (learner/model/rope.py, hf_config.py) and the engine's check."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from learner.model.hf_config import read_hf_arch, rope_softmax_scale
from learner.model.rope import RopeScaling, read_rope_scaling, rope_attention_factor, rope_inv_freq
from rollout_server.engine.hf_support import check_supported, rope_parameters, yarn_attention_factor

# DeepSeek-R1-0528-Qwen3-8B's config.json (with max_position_embeddings 131072, rope_theta 1000000).
R1_8B_ROPE: dict[str, Any] = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32768,
    "attn_factor": 0.8782488562869419,
}
R1_8B_SCALING = RopeScaling("yarn", 4.0, original_max_position_embeddings=32768, attn_factor=0.8782488562869419)


def _qwen3(rope: dict[str, Any] | None = None, theta: float = 1e6, max_pos: int = 131072, **kw: Any) -> Qwen3Config:
    params = {**(rope or {"rope_type": "default"}), "rope_theta": theta}
    return Qwen3Config(head_dim=128, max_position_embeddings=max_pos, rope_parameters=params, **kw)


def test_r1_8b_rope_block_is_read_in_every_spelling() -> None:
    """Guards against losing the YaRN block of DeepSeek-R1-0528-Qwen3-8B to a key spelling: transformers 5's
    `rope_parameters` (theta inside), the older `rope_scaling` with a separate rope_theta, and "type" for
    "rope_type" all give the same hashable HFArch, whose attention factor is SGLang's 1.1386 * 0.8782 = 1."""
    base = dict(
        model_type="qwen3", vocab_size=151936, num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=131072,
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, use_sliding_window=False,
    )  # fmt: skip
    v5 = read_hf_arch(_qwen3(R1_8B_ROPE))
    old = read_hf_arch(SimpleNamespace(**base, rope_theta=1e6, rope_scaling=R1_8B_ROPE))  # type: ignore[arg-type]
    old_type = {**R1_8B_ROPE, "type": "yarn"}
    del old_type["rope_type"]
    older = read_hf_arch(SimpleNamespace(**base, rope_theta=1e6, rope_scaling=old_type))  # type: ignore[arg-type]
    assert v5.rope_scaling == old.rope_scaling == older.rope_scaling == R1_8B_SCALING
    assert v5.rope_theta == old.rope_theta == 1e6
    assert hash(v5) == hash(read_hf_arch(_qwen3(R1_8B_ROPE)))
    assert rope_attention_factor(v5.rope_scaling) == pytest.approx(1.0, abs=1e-12)
    # Qwen3-4B-Thinking-2507: plain RoPE at theta 5e6, nothing scaled, megatron's own softmax scale.
    plain = read_hf_arch(_qwen3(theta=5e6, max_pos=262144))
    assert plain.rope_scaling is None and plain.rope_theta == 5e6 and rope_softmax_scale(plain) is None


@pytest.mark.parametrize(
    ("rope", "theta", "head_dim"),
    [
        ({k: v for k, v in R1_8B_ROPE.items() if k != "attn_factor"}, 1e6, 128),
        (
            {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 16,
                "beta_slow": 2,
                "mscale": 0.9,
                "mscale_all_dim": 0.5,
                "truncate": False,
            },
            1e4,
            64,
        ),  # fmt: skip
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 1e4, 32),
        ({"rope_type": "linear", "factor": 2.0}, 1e4, 32),
        ({"rope_type": "default"}, 5e6, 128),
    ],
)
def test_frequencies_and_attention_factor_equal_transformers(rope: dict[str, Any], theta: float, head_dim: int) -> None:
    """Guards the YaRN/linear arithmetic (correction range, ramp, truncate, betas, mscale ratio) against
    transformers' own rope init: bit-identical inverse frequencies and the same attention factor, for blocks
    that transformers and SGLang read alike; the softmax scale carries that factor squared."""
    config = Qwen3Config(
        head_dim=head_dim, max_position_embeddings=131072, rope_parameters={**rope, "rope_theta": theta}
    )
    init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    want_inv_freq, want_factor = (
        init(config) if init else (1.0 / (theta ** (torch.arange(0, head_dim, 2) / head_dim)), 1.0)
    )
    arch = read_hf_arch(config)
    assert torch.equal(rope_inv_freq(head_dim, theta, arch.rope_scaling), want_inv_freq)
    assert rope_attention_factor(arch.rope_scaling) == pytest.approx(want_factor, rel=1e-15)
    scale = rope_softmax_scale(arch)
    if want_factor == 1.0:
        assert scale is None
    else:
        assert scale == pytest.approx(want_factor**2 / math.sqrt(head_dim), rel=1e-15)


def test_attn_factor_is_read_as_sglang_does() -> None:
    """Guards against scoring DeepSeek-R1-0528-Qwen3-8B the way transformers does: transformers ignores
    `attn_factor` (cos/sin x1.1386), SGLang and vLLM multiply it in (x1.0); learner and engine follow SGLang."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf_factor = Qwen3RotaryEmbedding(_qwen3(R1_8B_ROPE)).attention_scaling
    assert hf_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)  # if transformers starts reading it, revisit
    sglang = (0.1 * math.log(4.0) + 1.0) * R1_8B_ROPE["attn_factor"]
    assert rope_attention_factor(R1_8B_SCALING) == pytest.approx(sglang, rel=1e-15)
    assert yarn_attention_factor(rope_parameters(_qwen3(R1_8B_ROPE))) == pytest.approx(sglang, rel=1e-15)
    # mscale with mscale_all_dim 0: transformers falls back to mscale(factor), SGLang takes the ratio.
    ratio = {"rope_type": "yarn", "factor": 4.0, "mscale": 0.5, "mscale_all_dim": 0.0}
    want = 0.1 * 0.5 * math.log(4.0) + 1.0
    assert rope_attention_factor(read_rope_scaling(ratio, 1024)) == pytest.approx(want, rel=1e-15)
    assert yarn_attention_factor(ratio) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize(
    ("rope", "match"),
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "rope_type 'longrope'"),
        ({"rope_type": "llama3", "factor": 8.0}, "rope_type 'llama3' is not supported"),
        ({**R1_8B_ROPE, "attention_factor": 1.0}, r"rope_type 'yarn': unsupported keys \['attention_factor'\]"),
        ({**R1_8B_ROPE, "extrapolation_factor": 0.5}, r"unsupported keys \['extrapolation_factor'\]"),
        ({**R1_8B_ROPE, "some_future_knob": 1}, r"unsupported keys \['some_future_knob'\]"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 4096}, "needs a 'factor'"),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_rope_is_refused_by_name(rope: dict[str, Any], match: str) -> None:
    """Guards against silently training with plain RoPE frequencies (or a guessed reading) on a model scaled in a
    way the learner does not implement: a ValueError naming the rope_type or key, with the model type."""
    config = SimpleNamespace(
        model_type="qwen3", vocab_size=10, num_hidden_layers=2, hidden_size=8, intermediate_size=12,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-6, max_position_embeddings=64,
        tie_word_embeddings=False, hidden_act="silu", rope_parameters={**rope, "rope_theta": 1e4},
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"^qwen3: .*{match}"):
        read_hf_arch(config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rope", "match"),
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported by the built-in engine"),
        ({**R1_8B_ROPE, "attention_factor": 1.0}, r"\['attention_factor'\] are read differently"),
    ],
)
def test_engine_refuses_rope_it_cannot_serve_as_sglang(rope: dict[str, Any], match: str) -> None:
    """Guards against the built-in engine serving a RoPE that its KV cache cannot follow (dynamic NTK changes the
    frequencies with each forward's length) or that SGLang reads differently: refused at load, naming it."""
    with pytest.raises(ValueError, match=match):
        check_supported(SimpleNamespace(model_type="qwen3", rope_parameters={**rope, "rope_theta": 1e4}))
    check_supported(_qwen3(R1_8B_ROPE))  # the 8B's block itself is served
