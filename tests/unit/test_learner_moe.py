"""Qwen3-MoE's config mapping (learner/model/moe.py), its refusals, its weight-name rules (convert.py) and the
micro-batch plan of expert parallelism; the parity with transformers is tests/integration/test_megatron_moe.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.config import ConfigError, load_config
from learner.config import LearnerConfig, LearnerModelConfig
from learner.model.convert import FusedGateUp, ParamMap, Split, fused_expert_source, param_map
from learner.model.hf_config import check_parallel_fit, read_hf_arch
from learner.model.moe import equal_micro_batch_counts, moe_config_kwargs


def _qwen3_moe(**overrides: object) -> SimpleNamespace:
    """Qwen3-30B-A3B's config.json fields."""
    fields: dict[str, object] = dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        num_hidden_layers=48,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
        output_router_logits=False,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_qwen3_moe_config_maps_to_megatron_moe() -> None:
    """Guards the router translation: Qwen3-MoE's softmax -> top-k -> renormalise is megatron's softmax over the
    top-k logits (pre_softmax off), without renormalisation softmax-then-top-k (pre_softmax on); the aux-loss
    coefficient defaults to the HF one and the flag overrides it; experts and EP reach the TransformerConfig."""
    arch = read_hf_arch(_qwen3_moe())
    assert arch.moe is not None and arch.qk_norm
    assert (arch.moe.num_experts, arch.moe.topk, arch.moe.ffn_hidden_size) == (128, 8, 768)
    cfg = LearnerModelConfig(ep_size=4)
    kwargs = moe_config_kwargs(arch.moe, cfg)
    assert kwargs["moe_router_pre_softmax"] is False and kwargs["moe_router_score_function"] == "softmax"
    assert kwargs["moe_aux_loss_coeff"] == 0.001 and kwargs["moe_router_load_balancing_type"] == "aux_loss"
    assert kwargs["moe_token_dispatcher_type"] == "allgather" and kwargs["moe_grouped_gemm"] is False
    assert kwargs["expert_model_parallel_size"] == 4
    unnormed = read_hf_arch(_qwen3_moe(norm_topk_prob=False)).moe
    assert moe_config_kwargs(unnormed, cfg)["moe_router_pre_softmax"] is True
    assert moe_config_kwargs(arch.moe, LearnerModelConfig(moe_aux_loss_coeff=0.0))["moe_aux_loss_coeff"] == 0.0
    dense = read_hf_arch(_qwen3_moe(model_type="qwen3"))
    assert dense.moe is None and moe_config_kwargs(None, cfg) == {"expert_model_parallel_size": 4}
    flags = load_config(LearnerConfig, None, ["--model.ep_size", "2", "--model.moe_aux_loss_coeff", "0.01"]).model
    assert (flags.ep_size, flags.moe_aux_loss_coeff) == (2, 0.01)
    with pytest.raises(ConfigError, match="--model.moe_aux_loss_coeff"):
        load_config(LearnerConfig, None, ["--model.moe_aux_loss_coeff", "-1"])


def test_transformer_config_of_a_tiny_qwen3_moe() -> None:
    """Guards the wiring into megatron: the TransformerConfig megatron validates carries the experts, the expert
    FFN size (not the dense intermediate size) and the routing options."""
    from learner.model.hf_config import transformer_config

    arch = read_hf_arch(_qwen3_moe(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16))
    config = transformer_config(arch, LearnerModelConfig())
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (128, 8, 768)
    assert not config.moe_router_pre_softmax and config.moe_aux_loss_coeff == 0.001
    assert config.expert_model_parallel_size == 1 and config.qk_layernorm


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mlp_only_layers": [0, 3]}, "mlp_only_layers"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ({"shared_expert_intermediate_size": 512}, "shared_expert_intermediate_size"),
        ({"num_experts_per_tok": 1}, "num_experts_per_tok 1 with norm_topk_prob"),
        ({"num_experts_per_tok": 129}, "num_experts_per_tok 129"),
    ],
)
def test_inexpressible_moe_configs_are_refused(overrides: dict[str, object], field: str) -> None:
    """Guards against silently training a different model: dense layers among MoE layers, sparse-step layouts,
    shared experts and top-1 renormalised routing have no exact megatron equivalent here, so reading the config
    fails and names the field."""
    with pytest.raises(ValueError, match=field):
        read_hf_arch(_qwen3_moe(**overrides))


def test_expert_parallel_fit_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards EP layouts: ep_size must divide the experts and world / (tp * pp), TP the expert FFN, and a dense
    model refuses EP, each error naming the flag (before any process group starts)."""
    arch = read_hf_arch(_qwen3_moe())
    with pytest.raises(ValueError, match="--model.ep_size 3 must divide num_experts 128"):
        check_parallel_fit(arch, LearnerModelConfig(ep_size=3))
    with pytest.raises(ValueError, match="--model.tp_size 4 must divide moe_intermediate_size 6"):
        check_parallel_fit(read_hf_arch(_qwen3_moe(moe_intermediate_size=6)), LearnerModelConfig(tp_size=4))
    with pytest.raises(ValueError, match="--model.ep_size 2 needs an MoE model"):
        check_parallel_fit(read_hf_arch(_qwen3_moe(model_type="qwen3")), LearnerModelConfig(ep_size=2))
    check_parallel_fit(arch, LearnerModelConfig(ep_size=8, tp_size=4))

    from learner.parallel import init_parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--model.tp_size \* --model.pp_size \* --model.ep_size = 4"):
        init_parallel(LearnerModelConfig(ep_size=4))


def test_moe_weight_names_with_expert_offset() -> None:
    """Guards the MoE name table: the router is the HF gate, a local expert maps to the global expert of its EP
    rank (offset + local index), fc1 fuses gate and up, fc2 is the row-parallel down_proj, both marked expert
    (sharded over the expert-TP group); a dense model still has no router."""
    arch = read_hf_arch(_qwen3_moe())
    layer = {0: 5}.__getitem__
    router = param_map("decoder.layers.0.mlp.router.weight", arch, 16, layer, expert_offset=64)
    assert type(router) is ParamMap and router.hf_names == ("model.layers.5.mlp.gate.weight",) and not router.expert
    fc1 = param_map("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight", arch, 16, layer, 64)
    assert isinstance(fc1, FusedGateUp) and fc1.expert
    assert fc1.hf_names == (
        "model.layers.5.mlp.experts.67.gate_proj.weight",
        "model.layers.5.mlp.experts.67.up_proj.weight",
    )
    fc2 = param_map("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight", arch, 16, layer, 64)
    assert isinstance(fc2, Split) and fc2.dim == 1 and fc2.expert
    assert fc2.hf_names == ("model.layers.5.mlp.experts.67.down_proj.weight",)
    with pytest.raises(ValueError, match="no HF mapping"):
        param_map("decoder.layers.0.mlp.router.weight", read_hf_arch(_qwen3_moe(model_type="qwen3")), 16, layer)


def test_fused_expert_source() -> None:
    """Guards reading transformers' fused expert tensors (save_original_format=False): gate and up come from
    gate_up_proj (gate rows first), down from down_proj, at the expert's index."""
    p = "model.layers.2.mlp.experts"
    assert fused_expert_source(f"{p}.7.gate_proj.weight") == (f"{p}.gate_up_proj", 7, "gate")
    assert fused_expert_source(f"{p}.7.up_proj.weight") == (f"{p}.gate_up_proj", 7, "up")
    assert fused_expert_source(f"{p}.12.down_proj.weight") == (f"{p}.down_proj", 12, "down")
    assert fused_expert_source("model.layers.2.mlp.gate_proj.weight") is None


def _tokens(mbs: list[list[int]], lengths: list[int]) -> list[int]:
    return [sum(lengths[i] for i in mb) for mb in mbs]


def test_equal_micro_batch_counts_splits_then_merges() -> None:
    """Guards EP training against a hang: every DP rank must run as many micro-batches (each MoE layer is a
    collective over EP ranks). A rank with fewer splits its largest micro-batch (never growing one past the
    budget); only a rank without enough sequences makes the others merge; every sample stays exactly once."""
    lengths = [40, 30, 20, 6, 5, 5]
    plan = [[[0, 3]], [[1], [2]]]
    out = equal_micro_batch_counts(plan, lengths)
    assert [len(r) for r in out] == [2, 2] and sorted(out[0]) == [[0], [3]] and out[1] == plan[1]
    assert equal_micro_batch_counts([[[0], [3]], [[1], [2]]], lengths) == [[[0], [3]], [[1], [2]]]
    # Rank 0 has one sequence: rank 1 merges its two smallest micro-batches.
    out = equal_micro_batch_counts([[[0]], [[1, 4], [2], [3, 5]]], lengths)
    assert [len(r) for r in out] == [1, 1] and sorted(out[1][0]) == [1, 2, 3, 4, 5]
    # Splits are balanced by length and keep every sample once.
    out = equal_micro_batch_counts([[[0, 1, 2, 3]], [[4], [5], [3]]], lengths)
    assert [len(r) for r in out] == [3, 3] and sorted(i for mb in out[0] for i in mb) == [0, 1, 2, 3]
    assert sorted(_tokens(out[0], lengths)) == [20, 36, 40]  # [40, 30, 20, 6] -> [40, 20] + [30, 6] -> ...
