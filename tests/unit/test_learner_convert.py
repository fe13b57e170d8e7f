"""The HF <-> megatron weight layouts of learner/model/convert.py, checked against megatron's documented layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from learner.model.convert import FusedGateUp, FusedQKV, ParamMap, Split, VocabSplit, param_map
from learner.model.hf_config import HFArch, padded_vocab_size, read_hf_arch


def _arch(**overrides: object) -> HFArch:
    fields: dict[str, object] = dict(
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
    fields.update(overrides)
    return HFArch(**fields)  # type: ignore[arg-type]


def _labelled(rows_per_label: int, labels: list[float], cols: int = 2) -> torch.Tensor:
    """Rows of `label` values, `rows_per_label` rows each: lets a test read which head a row came from."""
    return torch.tensor(labels).repeat_interleave(rows_per_label)[:, None].expand(-1, cols).clone()


def test_qkv_fusion_is_megatrons_per_group_interleave() -> None:
    """Guards the QKV layout: megatron stores, per query group g, [q heads of g; k_g; v_g] (not [q; k; v]),
    and TP rank r holds a contiguous block of whole groups."""
    d = 3
    q = _labelled(d, [0.0, 1.0, 2.0, 3.0])  # query heads 0..3
    k = _labelled(d, [10.0, 11.0])  # KV heads 0..1
    v = _labelled(d, [20.0, 21.0])
    m = FusedQKV(("q", "k", "v"), num_heads=4, num_kv_heads=2, head_dim=d)
    heads = m.to_local([q, k, v], 0, 1)[::d, 0].tolist()
    assert heads == [0.0, 1.0, 10.0, 20.0, 2.0, 3.0, 11.0, 21.0]
    shards = [m.to_local([q, k, v], r, 2) for r in range(2)]
    assert shards[1][::d, 0].tolist() == [2.0, 3.0, 11.0, 21.0]
    back = m.to_hf(shards)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_gate_up_fusion_keeps_gate_and_up_per_tp_shard() -> None:
    """Guards SwiGLU under TP: each rank's linear_fc1 is [its gate rows; its up rows], because megatron
    chunks fc1's output in two halves locally; splitting cat(gate, up) over TP would pair wrong rows."""
    gate, up = torch.arange(8.0)[:, None], 100 + torch.arange(8.0)[:, None]
    m = FusedGateUp(("gate", "up"))
    shards = [m.to_local([gate, up], r, 2) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0]
    back = m.to_hf(shards)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_vocab_split_pads_with_zero_rows_and_strips_padding() -> None:
    """Guards vocab padding: real rows keep their ids across TP shards, padding rows are zero, export drops them."""
    emb = torch.arange(1.0, 11.0)[:, None].expand(-1, 2).clone()
    m = VocabSplit(("e",), vocab=10, padded_vocab=16)
    shards = [m.to_local([emb], r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [8, 8]
    assert shards[1][:2, 0].tolist() == [9.0, 10.0] and not shards[1][2:].any()
    assert torch.equal(m.to_hf(shards)[0], emb)
    only_padding = VocabSplit(("e",), vocab=4, padded_vocab=16).to_local([emb[:4]], 3, 4)
    assert only_padding.shape == (4, 2) and not only_padding.any()


def test_row_parallel_split_round_trips() -> None:
    """Guards row-parallel layers (o_proj, down_proj): split along the input dim, gathered back exactly."""
    w = torch.randn(6, 8)
    m = Split(("w",), dim=1)
    shards = [m.to_local([w], r, 4) for r in range(4)]
    assert shards[0].shape == (6, 2) and torch.equal(shards[2], w[:, 4:6])
    assert torch.equal(m.to_hf(shards)[0], w)


def test_param_map_names_with_pipeline_offset_and_tied_output() -> None:
    """Guards the name table: PP stage offsets reach the HF layer index, a tied output layer is loaded from
    the embedding but never exported twice, and an unknown megatron parameter is an error, not a skip."""
    arch = _arch()
    offset = {0: 2, 1: 3}.__getitem__  # the second of two PP stages
    qkv = param_map("decoder.layers.1.self_attention.linear_qkv.weight", arch, 16, offset)
    assert qkv.hf_names[0] == "model.layers.3.self_attn.q_proj.weight"
    norm = param_map("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", arch, 16, offset)
    assert type(norm) is ParamMap and norm.hf_names == ("model.layers.2.input_layernorm.weight",)
    assert param_map("output_layer.weight", arch, 16, offset).hf_names == ("lm_head.weight",)
    tied = param_map("output_layer.weight", _arch(tie_word_embeddings=True), 16, offset)
    assert tied.hf_names == ("model.embed_tokens.weight",) and not tied.export
    with pytest.raises(ValueError, match="no HF mapping"):
        param_map("decoder.layers.0.mlp.router.weight", arch, 16, offset)


def _hf_config(**overrides: object) -> SimpleNamespace:
    fields: dict[str, object] = dict(
        model_type="qwen3",
        vocab_size=151936,
        num_hidden_layers=36,
        hidden_size=2560,
        intermediate_size=9728,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=5000000,
        rope_scaling=None,
        max_position_embeddings=262144,
        tie_word_embeddings=True,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_read_hf_arch_qwen3_4b_and_rejections() -> None:
    """Guards config translation: Qwen3-4B's config.json fields land in the right places (head_dim is not
    hidden/heads there), and unsupported features (dynamic RoPE, MoE, biases) fail loudly instead of loading wrong."""
    arch = read_hf_arch(_hf_config())
    assert (arch.head_dim, arch.num_kv_heads, arch.rope_theta, arch.qk_norm) == (128, 8, 5e6, True)
    assert arch.tie_word_embeddings and arch.ffn_hidden_size == 9728
    llama = read_hf_arch(_hf_config(model_type="llama", head_dim=None, rope_parameters={"rope_theta": 1e5}))
    assert llama.head_dim == 80 and not llama.qk_norm and llama.rope_theta == 1e5
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        read_hf_arch(_hf_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="qwen2_moe"):  # MoE families other than Qwen3-MoE (learner/model/moe.py)
        read_hf_arch(_hf_config(model_type="qwen2_moe"))
    with pytest.raises(ValueError, match="bias"):
        read_hf_arch(_hf_config(attention_bias=True))


def test_padded_vocab_size_is_aligned_per_tp_rank() -> None:
    """Guards vocab padding arithmetic: a multiple of divisible_by * tp, never smaller than the vocab."""
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 8) == 152576
    assert padded_vocab_size(500, 128, 2) == 512
    assert padded_vocab_size(512, 128, 2) == 512
