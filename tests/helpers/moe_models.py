"""Tiny Qwen3-MoE models (transformers' `Qwen3MoeForCausalLM`, random init) for end-to-end CPU tests, with the
tokenizer of the tiny Qwen3 test models, and the per-expert view of a transformers state dict."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

NUM_EXPERTS = 8
TOP_K = 2


def tiny_moe_model(out_dir: Path, seed: int = 0, *, tied: bool = True, fused_on_disk: bool = False) -> Path:
    """Write a 2-layer, hidden-64 Qwen3-MoE (8 experts, top-2) with a tokenizer to `out_dir`.

    Routers and experts get larger weights than HF's init (confident routing, experts that move the residual
    stream), so a wrong expert or routing weight shows in logprobs. `fused_on_disk`: save transformers' fused
    3-D expert tensors instead of one tensor per expert (the checkpoint layout the learner's export writes)."""
    import torch
    from transformers import AutoConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from rollout_server.models import init_tiny_model

    base = init_tiny_model(out_dir.with_name(out_dir.name + "-tokenizer"), hidden_size=64, num_layers=1, seed=seed)
    dense = AutoConfig.from_pretrained(base)
    config = Qwen3MoeConfig(
        vocab_size=dense.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        tie_word_embeddings=tied,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        bos_token_id=dense.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
            elif ".mlp.experts." in name:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = dense.eos_token_id
    model.generation_config.pad_token_id = dense.pad_token_id
    model.save_pretrained(out_dir, save_original_format=not fused_on_disk)
    for path in base.iterdir():
        if (
            path.is_file()
            and path.suffix != ".safetensors"
            and path.name not in ("config.json", "generation_config.json")
        ):
            shutil.copy2(path, out_dir / path.name)
    shutil.rmtree(base)
    return out_dir


def per_expert(state: dict[str, Any], tied: bool) -> dict[str, Any]:
    """A transformers Qwen3-MoE state dict under the per-expert names of an HF checkpoint (what the learner's
    export and its weight pushes send): fused `gate_up_proj` [E, 2I, H] split into gate then up rows."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            out |= {f"{prefix}{e}.down_proj.weight": t for e, t in enumerate(tensor)}
        elif not (tied and name == "lm_head.weight"):
            out[name] = tensor
    return out
