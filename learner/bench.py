"""`longtrace bench learner`: training tokens/s of the megatron learner vs a plain PyTorch loop.

Both sides run forward + backward + optimizer step (Adam, weight decay, grad clipping) on the same
batch of the same tiny Qwen3 weights, in the same process with the same torch threads, at TP1:
megatron-core GPTModel + megatron DDP + megatron optimizer through forward_backward_func, with the
RL loss quantity (token logprobs), vs transformers Qwen3ForCausalLM + torch.optim.AdamW with the
shifted cross-entropy. Steps alternate one by one so machine noise hits both sides alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.net import free_port
from common.progress import bar

if TYPE_CHECKING:
    import torch

Step = Callable[[], None]
"""One training step (forward, backward, optimizer) on the bench batch."""
LossFunc = Callable[["torch.Tensor"], tuple["torch.Tensor", dict[str, "torch.Tensor"]]]
"""megatron's loss function of one micro-batch's output: (loss, the values it logs)."""

LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0


def _tiny_qwen3(path: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)


def _megatron_step_fn(hf_path: Path, ids: torch.Tensor) -> Step:
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from learner.config import LearnerModelConfig
    from learner.logprobs import shifted_token_logprobs
    from learner.model.build import build_model, unwrap
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import init_parallel

    cfg = LearnerModelConfig(hf_path=str(hf_path))
    init_parallel(cfg)
    arch = load_hf_arch(hf_path)
    model = build_model(arch, cfg)
    load_hf_weights(model, hf_path, arch)
    config = unwrap(model).config
    config.finalize_model_grads_func = finalize_model_grads
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP), [model]
    )
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    forward_backward = get_forward_backward_func()

    def forward_step(data_iterator: Iterator[torch.Tensor], m: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]:
        batch = next(data_iterator)
        logits: torch.Tensor = m(batch, positions, None)

        def loss_func(out: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = -shifted_token_logprobs(out, batch, 1.0, arch.vocab_size).mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    def step() -> None:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter([ids]),
            model=[model],
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0],
        )
        ok, _, _ = optimizer.step()
        assert ok

    return step


def _torch_step_fn(hf_path: Path, ids: torch.Tensor) -> Step:
    import torch
    from transformers import AutoModelForCausalLM

    # As an nn.Module: transformers' decorated `PreTrainedModel.to` does not type-check with a device argument.
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    model.to(ids.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()

    return step


def run_learner_bench(batch_size: int = 4, seq_len: int = 256, steps: int = 10, threads: int = 1) -> dict[str, Any]:
    """Median step time of each side over `steps` timed steps each, interleaved one by one; tokens/s and ratio.

    `threads` torch threads for both sides. One by default: on a shared machine, multi-threaded CPU kernels
    stall whenever another process holds a core, which swamps the difference being measured.
    """
    import torch

    from learner.parallel import destroy_parallel

    if batch_size < 1 or seq_len < 2 or steps < 1 or threads < 1:
        raise ValueError("--batch-size, --steps and --threads must be >= 1 and --seq-len >= 2")
    torch.set_num_threads(threads)
    # A world of one rank on a free port, unless torchrun already set one up.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    with tempfile.TemporaryDirectory() as tmp:
        hf_path = Path(tmp) / "tiny-qwen3"
        _tiny_qwen3(hf_path)
        ids = torch.randint(0, 512, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
        ids = ids.to("cuda" if torch.cuda.is_available() else "cpu")
        step_fns = {"megatron": _megatron_step_fn(hf_path, ids), "torch": _torch_step_fn(hf_path, ids)}
        times: dict[str, list[float]] = {name: [] for name in step_fns}
        for step in step_fns.values():  # warm-up: allocator, first-call dispatch, optimizer state
            step()
            step()
        # One step each in turn: on a shared machine, load changes hit both sides alike.
        with bar(steps * len(step_fns), "bench learner", "step") as progress:  # timed steps, both sides
            for _ in range(steps):
                for name, step in step_fns.items():
                    torch.cuda.synchronize()  # a no-op on CPU (learner.compat)
                    start = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
                    progress.update()  # after the timed span
        destroy_parallel()
    tokens = batch_size * seq_len
    tokens_per_s = tokens / statistics.median(times["megatron"])
    baseline = tokens / statistics.median(times["torch"])
    return {
        "bench": "learner",
        "tokens_per_s": round(tokens_per_s, 1),
        "baseline_tokens_per_s": round(baseline, 1),
        "ratio": round(tokens_per_s / baseline, 3),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "model": "tiny Qwen3 (hidden 128, 2 layers, 4 heads / 2 KV, vocab 512), fp32, TP1",
    }
