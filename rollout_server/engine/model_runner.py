"""The batched forward over a KV cache, built from a Hugging Face model's own modules and weights.

Supports the Llama family layout (Llama, Qwen2, Qwen3 with q/k norms; RoPE from the model's rotary module, YaRN
with SGLang's attention factor: hf_support.py) and Qwen3-MoE, whose sparse MLP blocks run as transformers' own
modules (router and experts hold no cache). One `forward` serves prefill and decode: each sequence brings its new tokens and the position
they start at, sequences of different lengths are padded to the longest and kept apart by the attention mask, and
new K/V are written to the sequence's cache slot before attention reads the slot back.

Weight updates name tensors as an HF checkpoint does; per-expert names are views of transformers' fused expert
parameters (`weight_targets`; the naming: hf_support.py). With `return_routed_experts` a hook on each MoE router
records the top-k expert ids of every new token (`last_routed_experts`, read by the scheduler).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollout_server.engine.hf_support import (
    EXPERT_NAME,
    SHAPE_KEYS,
    check_supported,
    expert_parts,
    rope_parameters,
    yarn_attention_factor,
)
from rollout_server.engine.kv_cache import KVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's tensors for the fast path; the fused matrices back the HF parameters (views). A sparse
    MoE layer has `moe` (transformers' block, run as is) instead of the dense MLP tensors."""

    ln1: torch.Tensor
    ln1_eps: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qk_eps: float
    o: torch.Tensor
    o_bias: torch.Tensor | None
    ln2: torch.Tensor
    ln2_eps: float
    gate_up: torch.Tensor | None
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor] | None
    moe: nn.Module | None = None


def _fuse_rows(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate Linear weights (and biases) row-wise and re-point each Linear at its slice of the result, so
    one matmul serves them all and a weight update through the HF parameter names lands in the fused matrix."""
    weight = torch.cat([m.weight.data for m in linears]).contiguous()
    biases = [m.bias for m in linears]
    bias = (
        torch.cat([b.data for b in biases if b is not None]).contiguous()
        if all(b is not None for b in biases)
        else None
    )
    offset = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[offset : offset + rows]
        if bias is not None and m.bias is not None:
            m.bias.data = bias[offset : offset + rows]
        offset += rows
    return weight, bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama/Qwen RMSNorm: normalise in float32, cast back, then scale."""
    return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


class ModelRunner:
    """Owns the HF model and the KV cache; used only from the scheduler thread."""

    def __init__(
        self,
        model_path: str,
        num_slots: int,
        context_length: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model_path}: no config.json (expected a Hugging Face model directory)")
        hf_config = AutoConfig.from_pretrained(path)
        check_supported(hf_config)
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model: Any = loaded.to(self.device).eval()
        self.config: Any = self.model.config
        self.model_path = str(path)
        inner = self.model.model
        self.embed: nn.Module = inner.embed_tokens
        self.layers: list[Any] = list(inner.layers)
        self.norm: nn.Module = inner.norm
        self.rotary: nn.Module = inner.rotary_emb
        rope = rope_parameters(self.config)
        if rope.get("rope_type") == "yarn":
            self.rotary.attention_scaling = yarn_attention_factor(rope)
        self.lm_head: nn.Module = self.model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scaling
        self.num_kv_heads: int = self.config.num_key_value_heads
        self.num_heads: int = self.config.num_attention_heads
        self.vocab_size: int = self.config.vocab_size
        max_pos = int(getattr(self.config, "max_position_embeddings", 4096))
        self.context_length = context_length or min(max_pos, 4096)
        if self.context_length > max_pos:
            raise ValueError(f"--context_length {self.context_length} exceeds the model's {max_pos} positions")
        with torch.no_grad():
            self.fused = [self._fuse(layer) for layer in self.layers]
        self._routed: list[torch.Tensor] = []
        self.last_routed_experts: torch.Tensor | None = None
        """int32 [B, T, moe_layers, topk]: the experts of the last forward's new tokens (padded ones included); None
        for a dense model."""
        for lw in self.fused:
            if lw.moe is not None:
                gate: Any = lw.moe.gate
                gate.register_forward_hook(self._capture_routing)
        self.expert_parts: dict[str, list[str]] = expert_parts(self.parameter_names())
        """Fused expert parameter name -> the per-expert checkpoint names of its slices (MoE models only)."""
        self.param_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            name: (tuple(t.shape), t.dtype) for name, t in self.weight_targets().items()
        }
        """Loadable name (HF parameters, per-expert names included) -> (shape, dtype); fixed for the runner's life,
        so readable from any thread."""
        self.cache = KVCache(
            len(self.layers), num_slots, self.num_kv_heads, self.context_length, self.head_dim, dtype, self.device
        )
        self.weight_loads = 0
        """How many times `load_weights` wrote parameters (the scheduler shares no K/V computed before a load)."""
        log.info(
            "model %s (%s, %d layers, vocab %d) on %s %s; KV cache %d slots x %d tokens (%.0f MiB)", path,
            self.config.model_type, len(self.layers), self.vocab_size, self.device, dtype, num_slots,
            self.context_length, self.cache.nbytes / 2**20,
        )  # fmt: skip

    @staticmethod
    def _fuse(layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj])
        sparse = hasattr(mlp, "experts")  # Qwen3-MoE's sparse block (its mlp_only_layers are dense)
        gate_up, gate_up_bias = (None, None) if sparse else _fuse_rows([mlp.gate_proj, mlp.up_proj])
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        return _Layer(
            ln1=layer.input_layernorm.weight,
            ln1_eps=layer.input_layernorm.variance_epsilon,
            qkv=qkv,
            qkv_bias=qkv_bias,
            q_norm=None if q_norm is None else q_norm.weight,
            k_norm=None if k_norm is None else k_norm.weight,
            qk_eps=1e-6 if q_norm is None else q_norm.variance_epsilon,
            o=attn.o_proj.weight,
            o_bias=attn.o_proj.bias,
            ln2=layer.post_attention_layernorm.weight,
            ln2_eps=layer.post_attention_layernorm.variance_epsilon,
            gate_up=gate_up,
            gate_up_bias=gate_up_bias,
            down=None if sparse else mlp.down_proj.weight,
            down_bias=None if sparse else mlp.down_proj.bias,
            act=None if sparse else mlp.act_fn,
            moe=mlp if sparse else None,
        )

    @property
    def is_moe(self) -> bool:
        return any(lw.moe is not None for lw in self.fused)

    def _capture_routing(self, module: nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
        self._routed.append(output[2])  # transformers' router: (logits, weights, indices [tokens, topk])

    @torch.inference_mode()
    def forward(
        self,
        slots: Sequence[int],
        tokens: Sequence[Sequence[int]],
        starts: Sequence[int],
        all_logits_for: Iterable[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run sequence b's `tokens[b]` at positions starts[b].. against its cache slot.

        Returns float32 logits of each sequence's last new token [B, V], and for the batch indices in
        `all_logits_for` the float32 logits of all of its new tokens [len, V] (prompt logprobs).
        """
        dev = self.device
        self._routed = []
        batch = len(slots)
        lens = torch.tensor([len(t) for t in tokens], device=dev)
        width = int(lens.max())
        start_t = torch.tensor(starts, device=dev)
        ids = torch.zeros(batch, width, dtype=torch.long, device=dev)
        for b, seq in enumerate(tokens):
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=dev)
        offsets = torch.arange(width, device=dev)
        pos = start_t.unsqueeze(1) + offsets.unsqueeze(0)  # [B, T]
        valid = offsets.unsqueeze(0) < lens.unsqueeze(1)  # [B, T]
        ctx = int((start_t + lens).max())
        assert ctx <= self.context_length, f"sequence of {ctx} tokens exceeds the cache's {self.context_length}"
        # Query at position p sees keys 0..p of its own slot; padded queries see garbage we discard.
        # Rows are (query group, position) pairs: GQA without materialising repeated K/V.
        group = self.num_heads // self.num_kv_heads
        allowed = torch.arange(ctx, device=dev).view(1, 1, ctx) <= pos.unsqueeze(-1)  # [B, T, ctx]
        bias = torch.zeros(batch, 1, 1, width, ctx, dtype=torch.float32, device=dev)
        bias.masked_fill_(~allowed.view(batch, 1, 1, width, ctx), float("-inf"))
        bias = bias.expand(batch, 1, group, width, ctx).reshape(batch, 1, group * width, ctx)
        slot_t = torch.tensor(slots, device=dev)
        # A dense run of slots is read through a view; anything else is gathered (a copy).
        dense = list(slots) == list(range(slots[0], slots[0] + batch))
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        write_slot, write_pos = slot_t[b_idx], pos[b_idx, t_idx]

        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        linear = torch.nn.functional.linear
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for i, lw in enumerate(self.fused):
            x = rms_norm(hidden, lw.ln1, lw.ln1_eps)
            q, k, v = torch.split(linear(x, lw.qkv, lw.qkv_bias), [q_dim, kv_dim, kv_dim], dim=-1)
            q = q.reshape(batch, width, -1, self.head_dim)
            k = k.reshape(batch, width, -1, self.head_dim)
            v = v.reshape(batch, width, -1, self.head_dim)
            if lw.q_norm is not None and lw.k_norm is not None:
                q, k = rms_norm(q, lw.q_norm, lw.qk_eps), rms_norm(k, lw.k_norm, lw.qk_eps)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k_cache, v_cache = self.cache.k[i], self.cache.v[i]
            k_cache[write_slot, :, write_pos] = k.transpose(1, 2)[b_idx, t_idx].to(k_cache.dtype)
            v_cache[write_slot, :, write_pos] = v[b_idx, t_idx].to(v_cache.dtype)
            if dense:
                keys = k_cache[slots[0] : slots[0] + batch, :, :ctx]
                values = v_cache[slots[0] : slots[0] + batch, :, :ctx]
            else:
                keys, values = k_cache[slot_t, :, :ctx], v_cache[slot_t, :, :ctx]
            # [B, KV, G*T, D] queries against [B, KV, ctx, D] keys, scores in float32.
            qg = q.reshape(batch, self.num_kv_heads, group * width, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scaling + bias
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            out = torch.matmul(probs, values).view(batch, self.num_heads, width, self.head_dim)
            hidden = hidden + linear(out.transpose(1, 2).reshape(batch, width, -1), lw.o, lw.o_bias)
            x = rms_norm(hidden, lw.ln2, lw.ln2_eps)
            if lw.moe is not None:  # routed per token: padded tokens change no real token's experts
                hidden = hidden + lw.moe(x)
                continue
            assert lw.gate_up is not None and lw.down is not None and lw.act is not None
            gate, up = linear(x, lw.gate_up, lw.gate_up_bias).chunk(2, dim=-1)
            hidden = hidden + linear(lw.act(gate) * up, lw.down, lw.down_bias)
        if self._routed:
            routed = torch.stack(self._routed, dim=1).to(torch.int32)  # [B * T, moe_layers, topk]
            self.last_routed_experts = routed.view(batch, width, *routed.shape[1:]).cpu()
            self._routed = []
        hidden = self.norm(hidden)
        last = hidden[torch.arange(batch, device=dev), lens - 1]
        logits = self.lm_head(last).float()
        full = {b: self.lm_head(hidden[b, : len(tokens[b])]).float() for b in all_logits_for}
        return logits, full

    def parameter_names(self) -> dict[str, nn.Parameter]:
        """HF parameter names -> parameters, tied names included (lm_head.weight with tied embeddings)."""
        return dict(self.model.named_parameters(remove_duplicate=False))

    def weight_targets(self) -> dict[str, torch.Tensor]:
        """Every name a weight update may use -> the tensor it writes: the HF parameters (their data), and for a
        MoE model each expert's checkpoint names -> views of its slices of the fused expert parameters
        (`gate_proj` the first I rows of `gate_up_proj[e]`, `up_proj` the next I, `down_proj` `down_proj[e]`).
        The views are contiguous, so a paused engine receives straight into them."""
        params = self.parameter_names()
        targets: dict[str, torch.Tensor] = {name: p.data for name, p in params.items()}
        for fused, parts in self.expert_parts.items():
            data = params[fused].data
            for name in parts:
                m = EXPERT_NAME.match(name)
                assert m is not None
                e, proj = int(m["expert"]), m["proj"]
                if proj == "down":
                    targets[name] = data[e]
                else:
                    rows = data.shape[1] // 2
                    targets[name] = data[e, :rows] if proj == "gate" else data[e, rows:]
        return targets

    def unknown_name(self, name: str) -> str:
        """Why `name` is not loadable, for an error message."""
        m = EXPERT_NAME.match(name)
        if m is not None:
            fused = f"{m['prefix']}.{'down_proj' if m['proj'] == 'down' else 'gate_up_proj'}"
            if fused in self.expert_parts:
                experts = self.parameter_names()[fused].shape[0]
                return f"unknown parameter {name!r}: expert {m['expert']} out of range (the model has {experts})"
            return f"unknown parameter {name!r}: the served model has no experts at {m['prefix']!r}"
        return f"unknown parameter {name!r}"

    @torch.no_grad()
    def load_weights(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the parameters (or expert slices) they name; all are checked before any is written."""
        params = self.weight_targets()
        problems = []
        for name, tensor in named:
            p = params.get(name)
            if p is None:
                problems.append(self.unknown_name(name))
            elif tuple(p.shape) != tuple(tensor.shape):
                problems.append(f"{name}: shape {list(tensor.shape)} != model's {list(p.shape)}")
        if problems:
            raise ValueError(
                "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
            )
        for name, tensor in named:
            params[name].copy_(tensor.to(self.device))
        self.weight_loads += 1

    def stage_from_disk(self, model_path: str, cancelled: threading.Event) -> list[tuple[str, torch.Tensor]] | None:
        """Read a HF directory of the same architecture into new CPU tensors of the parameters' dtypes, checked
        against the served parameters' names and shapes; None once `cancelled` is set (checked between tensors).

        Safe off the scheduler thread: it reads only the parameters' names, shapes and dtypes, which never change,
        and leaves the model alone; `load_weights` (on the scheduler thread) swaps them in."""
        from safetensors import safe_open

        path = Path(model_path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model_path {model_path!r}: no config.json")
        new_config = json.loads(config_file.read_text())
        for key in SHAPE_KEYS:
            mine = getattr(self.config, key, None)
            if key in new_config and new_config[key] != mine:
                raise ValueError(f"model_path {model_path!r}: {key} is {new_config[key]}, the served model has {mine}")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model_path {model_path!r}: no *.safetensors files")
        named: list[tuple[str, torch.Tensor]] = []
        problems: list[str] = []
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if cancelled.is_set():
                        return None
                    spec = self.param_specs.get(name)
                    tensor = f.get_tensor(name)
                    if spec is None:
                        problems.append(self.unknown_name(name))
                    elif tuple(tensor.shape) != spec[0]:
                        problems.append(f"{name}: shape {list(tensor.shape)} != model's {list(spec[0])}")
                    else:
                        named.append((name, tensor.to(spec[1])))
        tied = {"lm_head.weight"} if getattr(self.config, "tie_word_embeddings", False) else set()
        # Experts may come fused or per expert: a fused tensor covers its per-expert names, all of them cover it.
        present = {name for name, _ in named}
        for fused, parts in self.expert_parts.items():
            if fused in present or all(part in present for part in parts):
                present |= {fused, *parts}
        missing = sorted(set(self.param_specs) - present - tied)
        if missing:
            problems.append(f"missing parameters {missing[:5]}")
        if problems:
            more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
            raise ValueError(f"model_path {model_path!r}: " + "; ".join(problems[:10]) + more)
        return named
