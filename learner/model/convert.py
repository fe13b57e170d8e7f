"""The name and shape mapping between Hugging Face and megatron-core weights (pure tensor code, no megatron).

Each megatron parameter gets a `ParamMap`: which HF tensors it is made of, how to cut this TP rank's
shard out of them (`to_local`) and how to rebuild the HF tensors from every TP rank's shard (`to_hf`).

Megatron layouts (per TP rank r of t; ng query groups = KV heads, hpg = query heads per group, d = head_dim):
- linear_qkv: for each of the rank's ng/t groups, [q heads of the group (hpg*d rows); k (d); v (d)].
  Concatenating the TP shards gives the TP=1 layout (groups are split contiguously).
- linear_fc1: [gate rows of shard r; up rows of shard r]. Concatenating the TP shards does NOT give
  [gate; up]; `to_hf` splits each shard.
- linear_proj / linear_fc2: row-parallel, split along the input dim (1).
- embedding / output_layer: vocab rows padded with zeros to `padded_vocab`, split along dim 0.
- norms: replicated.

Rules are looked up per layer-relative name in `_LAYER_RULES`; a Qwen3-MoE layer (`arch.moe`) adds
`mlp.router.weight` <- `mlp.gate.weight` (replicated) and `mlp.experts.local_experts.{e}.linear_fc{1,2}.weight`
<- `mlp.experts.{E}.{gate,up,down}_proj.weight` with global expert E = expert_offset + e (expert-parallel
rank * local experts), reusing `FusedGateUp` and `Split` marked `expert`: their shards follow the expert-TP
group, not the TP group. HF stores experts one by one (transformers' `save_pretrained` default); the fused
`mlp.experts.gate_up_proj` / `down_proj` tensors of `save_original_format=False` are read through
`fused_expert_source`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.model.hf_config import HFArch


@dataclass(frozen=True)
class ParamMap:
    """A megatron parameter that is one HF tensor, replicated on every TP rank (norm weights)."""

    hf_names: tuple[str, ...]
    export: bool = True
    """False for a copy that HF does not store separately (a tied output layer on the last PP stage)."""
    expert: bool = False
    """One of this expert-parallel rank's experts: sharded over the expert-TP group, other EP ranks hold the rest."""

    @property
    def tp_sharded(self) -> bool:
        return False

    def to_local(self, hf: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        """This TP rank's shard, from the full HF tensors (in `hf_names` order)."""
        return hf[0]

    def to_hf(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """The full HF tensors (in `hf_names` order), from every TP rank's shard in rank order."""
        return [shards[0]]


@dataclass(frozen=True)
class Split(ParamMap):
    """One HF tensor split evenly along `dim` (0: column-parallel output rows, 1: row-parallel inputs)."""

    dim: int = 0

    @property
    def tp_sharded(self) -> bool:
        return True

    def to_local(self, hf: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        assert hf[0].shape[self.dim] % tp_size == 0, (hf[0].shape, self.dim, tp_size)
        return hf[0].chunk(tp_size, dim=self.dim)[tp_rank]

    def to_hf(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(shards, dim=self.dim)]


@dataclass(frozen=True)
class VocabSplit(ParamMap):
    """Embedding or output rows: padded with zero rows up to `padded_vocab`, then split along dim 0."""

    vocab: int = 0
    padded_vocab: int = 0

    @property
    def tp_sharded(self) -> bool:
        return True

    def to_local(self, hf: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        full = hf[0]
        assert full.shape[0] == self.vocab, (full.shape, self.vocab)
        rows = self.padded_vocab // tp_size
        start = tp_rank * rows
        out = full.new_zeros((rows, *full.shape[1:]))
        real = max(0, min(self.vocab - start, rows))
        out[:real] = full[start : start + real]
        return out

    def to_hf(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(shards, dim=0)[: self.vocab]]


@dataclass(frozen=True)
class FusedQKV(ParamMap):
    """q_proj, k_proj, v_proj fused into megatron's per-query-group interleaved linear_qkv."""

    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0

    @property
    def tp_sharded(self) -> bool:
        return True

    def to_local(self, hf: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        q, k, v = hf
        ng, d = self.num_kv_heads, self.head_dim
        hpg = self.num_heads // ng
        groups = slice(tp_rank * ng // tp_size, (tp_rank + 1) * ng // tp_size)
        rest = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(ng, hpg * d, *rest)[groups],
                k.reshape(ng, d, *rest)[groups],
                v.reshape(ng, d, *rest)[groups],
            ],
            dim=1,
        )
        return fused.reshape(-1, *rest)

    def to_hf(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        ng, d = self.num_kv_heads, self.head_dim
        hpg = self.num_heads // ng
        full = torch.cat(shards, dim=0)
        rest = full.shape[1:]
        q, k, v = torch.split(full.reshape(ng, (hpg + 2) * d, *rest), [hpg * d, d, d], dim=1)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


@dataclass(frozen=True)
class FusedGateUp(ParamMap):
    """gate_proj and up_proj fused into linear_fc1: each TP shard is [gate shard; up shard] (SwiGLU)."""

    @property
    def tp_sharded(self) -> bool:
        return True

    def to_local(self, hf: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        gate, up = hf
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)

    def to_hf(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]


def _attn(arch: HFArch, p: str) -> ParamMap:
    return FusedQKV(
        hf_names=(f"{p}.self_attn.q_proj.weight", f"{p}.self_attn.k_proj.weight", f"{p}.self_attn.v_proj.weight"),
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
    )


# Megatron name inside decoder.layers.N -> ParamMap, given the arch and the HF prefix "model.layers.<global N>".
# Local-spec and Transformer-Engine-spec names of the same norm both appear (TE fuses norms into the linear).
_LAYER_RULES: dict[str, Callable[[HFArch, str], ParamMap]] = {
    "input_layernorm.weight": lambda a, p: ParamMap((f"{p}.input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": lambda a, p: ParamMap((f"{p}.input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": _attn,
    "self_attention.q_layernorm.weight": lambda a, p: ParamMap((f"{p}.self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": lambda a, p: ParamMap((f"{p}.self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": lambda a, p: Split((f"{p}.self_attn.o_proj.weight",), dim=1),
    "pre_mlp_layernorm.weight": lambda a, p: ParamMap((f"{p}.post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": lambda a, p: ParamMap((f"{p}.post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": lambda a, p: FusedGateUp((f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": lambda a, p: Split((f"{p}.mlp.down_proj.weight",), dim=1),
}

_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_LOCAL_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight")
_HF_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def _moe_rule(name: str, p: str, expert_offset: int) -> ParamMap | None:
    """An MoE layer's router or expert weight (layer-relative `name`, HF layer prefix `p`), else None."""
    if name == "mlp.router.weight":
        return ParamMap((f"{p}.mlp.gate.weight",))
    match = _LOCAL_EXPERT.fullmatch(name)
    if match is None:
        return None
    e = f"{p}.mlp.experts.{expert_offset + int(match.group(1))}"
    if match.group(2) == "linear_fc1":
        return FusedGateUp((f"{e}.gate_proj.weight", f"{e}.up_proj.weight"), expert=True)
    return Split((f"{e}.down_proj.weight",), expert=True, dim=1)


def fused_expert_source(hf_name: str) -> tuple[str, int, str] | None:
    """For a per-expert HF name, the fused tensor that may hold it instead, the expert index and the part
    (gate, up, down): `...mlp.experts.gate_up_proj` [experts, 2 * I, hidden] (gate rows first) or
    `...mlp.experts.down_proj` [experts, hidden, I]. None for any other name."""
    match = _HF_EXPERT.fullmatch(hf_name)
    if match is None:
        return None
    prefix, expert, part = match.group(1), int(match.group(2)), match.group(3)
    return f"{prefix}.{'down_proj' if part == 'down' else 'gate_up_proj'}", expert, part


def param_map(
    name: str, arch: HFArch, padded_vocab: int, global_layer: Callable[[int], int], expert_offset: int = 0
) -> ParamMap:
    """The mapping of megatron parameter `name` (of an unwrapped GPTModel on this rank).

    `global_layer(i)` turns the stage-local layer index of `decoder.layers.i` into the model's layer index
    (the pipeline offset); `expert_offset` is the global index of the rank's first local expert.
    Raises ValueError for a parameter this mapping does not know.
    """
    if name == "embedding.word_embeddings.weight":
        return VocabSplit(("model.embed_tokens.weight",), vocab=arch.vocab_size, padded_vocab=padded_vocab)
    if name == "output_layer.weight":
        if arch.tie_word_embeddings:  # last PP stage's copy of the embedding (megatron keeps the two in sync)
            return VocabSplit(
                ("model.embed_tokens.weight",), export=False, vocab=arch.vocab_size, padded_vocab=padded_vocab
            )
        return VocabSplit(("lm_head.weight",), vocab=arch.vocab_size, padded_vocab=padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return ParamMap(("model.norm.weight",))
    match = _LAYER_NAME.fullmatch(name)
    if match:
        prefix = f"model.layers.{global_layer(int(match.group(1)))}"
        if match.group(2) in _LAYER_RULES:
            return _LAYER_RULES[match.group(2)](arch, prefix)
        moe = _moe_rule(match.group(2), prefix, expert_offset) if arch.moe is not None else None
        if moe is not None:
            return moe
    raise ValueError(f"no HF mapping for megatron parameter {name!r} ({arch.model_type})")
