"""The learner's model config: defaults, TOML + flag overrides, and the checks that name the offending flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from learner.config import LearnerConfig
from learner.model.hf_config import HFArch, check_parallel_fit

TINY = HFArch(
    model_type="qwen3",
    vocab_size=10,
    num_layers=4,
    hidden_size=8,
    ffn_hidden_size=12,
    num_heads=4,
    num_kv_heads=2,
    head_dim=3,
    norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    qk_norm=True,
    init_std=0.02,
)


def test_model_section_loads_from_toml_and_flags(tmp_path: Path) -> None:
    """Guards the `model` section wiring: TOML values apply, `--model.key` flags win, unknown keys fail."""
    path = tmp_path / "learner.toml"
    path.write_text('[model]\nhf_path = "/models/qwen3"\ntp_size = 2\ndtype = "bf16"\n')
    cfg = load_config(LearnerConfig, path, ["--model.pp_size", "2", "--model.tp_size", "1"])
    assert (cfg.model.hf_path, cfg.model.tp_size, cfg.model.pp_size, cfg.model.dtype) == ("/models/qwen3", 1, 2, "bf16")
    with pytest.raises(ConfigError, match="--model.tp_sze"):
        load_config(LearnerConfig, None, ["--model.tp_sze", "2"])
    with pytest.raises(ConfigError, match="--model.dtype"):
        load_config(LearnerConfig, None, ["--model.dtype", "fp16"])


def test_gpu_only_parallelism_is_rejected_without_transformer_engine() -> None:
    """Guards the CP / sequence-parallel options: SP needs Transformer Engine and TP > 1, local CP needs the SDPA
    core attention (megatron's unfused one has no CP); the error names the flag instead of failing deep inside
    megatron."""
    with pytest.raises(ConfigError, match="--model.cp_size > 1 with local layers needs --model.core_attention sdpa"):
        load_config(LearnerConfig, None, ["--model.cp_size", "2", "--model.core_attention", "megatron"])
    assert load_config(LearnerConfig, None, ["--model.cp_size", "2"]).model.cp_size == 2
    with pytest.raises(ConfigError, match="--model.sequence_parallel needs --model.transformer_impl"):
        load_config(LearnerConfig, None, ["--model.sequence_parallel"])
    with pytest.raises(ConfigError, match="--model.sequence_parallel needs --model.tp_size"):
        load_config(
            LearnerConfig, None, ["--model.sequence_parallel", "--model.transformer_impl", "transformer_engine"]
        )
    ok = load_config(LearnerConfig, None, ["--model.cp_size", "2", "--model.transformer_impl", "transformer_engine"])
    assert ok.model.cp_size == 2


def test_parallel_fit_names_the_flag() -> None:
    """Guards model/layout mismatches: TP must divide the KV heads, PP the layers, with the flag in the message."""
    cfg = load_config(LearnerConfig, None, ["--model.tp_size", "4"]).model
    with pytest.raises(ValueError, match="--model.tp_size 4 must divide num_key_value_heads 2"):
        check_parallel_fit(TINY, cfg)
    cfg = load_config(LearnerConfig, None, ["--model.pp_size", "3"]).model
    with pytest.raises(ValueError, match="--model.pp_size 3 must divide num_hidden_layers 4"):
        check_parallel_fit(TINY, cfg)


def test_dist_timeout_must_outlast_a_weight_push_attempt() -> None:
    """Guards against issue 19's timeout ordering: with distributed weight sync the learner's other ranks wait in a
    collective while rank 0 pushes; a `dist_timeout_s` below one push attempt's worst case (a hung engine) times out
    the learner's own group and kills the run instead of failing the push. The error names the flags."""
    from learner.train_config import TrainConfig

    base = ["--model.hf_path", "m", "--data.dataset_path", "d", "--weight_sync.type", "distributed"]
    cfg = load_config(TrainConfig, None, base)
    assert cfg.model.dist_timeout_s > cfg.weight_sync.attempt_bound_s == 890  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"--model.dist_timeout_s 800 must exceed 890 s.*broadcast_timeout_s"):
        load_config(TrainConfig, None, [*base, "--model.dist_timeout_s", "800"])
    with pytest.raises(ConfigError, match="must exceed 1290 s"):
        load_config(TrainConfig, None, [*base, "--weight_sync.broadcast_timeout_s", "500"])
    load_config(TrainConfig, None, [*base[:4], "--model.dist_timeout_s", "60"])  # no push: no bound
