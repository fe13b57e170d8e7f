"""megatron-core's training machinery on CPU through learner.compat, on 2 real torchrun gloo ranks.

The training-loop issue builds on these: megatron DDP, the megatron Adam optimizer (plain and
distributed), grad clipping, forward_backward_func (1F1B at PP2), bf16 via Float16Module and
dist_checkpointing. Each scenario takes optimizer steps on a fixed batch with the RL quantity
(-mean token logprob) as the loss and checks what a broken redirection would break.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dist import init_worker_process_group, run_torchrun

SEQ, BATCH, STEPS = 16, 4, 3


def _save_tiny_qwen3(path: Path, tie: bool) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)


def _train(model: Any, optimizer: Any, ids: Any, num_microbatches: int, vocab: int) -> tuple[list[float], list[float]]:
    """STEPS optimizer steps on `ids`; returns (loss per step on the last stage, grad norm per step)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from learner.logprobs import shifted_token_logprobs

    micro = ids.chunk(num_microbatches)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(micro[0])
    losses, norms = [], []
    for _ in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()

        def step(data_iterator: Any, m: Any) -> Any:
            batch = next(data_iterator)
            logits = m(batch, positions, None)

            def loss_func(output: Any) -> Any:
                loss = -shifted_token_logprobs(output, batch, 1.0, vocab).mean()
                return loss, {"loss": loss.detach().clone()}

            return logits, loss_func

        out = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(micro),
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=ids.shape[1],
            micro_batch_size=micro[0].shape[0],
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step skipped"
        losses.append(sum(float(o["loss"]) for o in out) / num_microbatches if out else float("nan"))
        norms.append(float(grad_norm))
    return losses, norms


# (name, hf dir, tp, pp, dtype, distributed optimizer, microbatches)
SCENARIOS = (
    ("tp2", "untied", 2, 1, "fp32", False, 1),
    ("dp2-distopt-tied", "tied", 1, 1, "fp32", True, 1),
    ("pp2-1f1b-bf16-tied", "tied", 1, 2, "bf16", False, 2),
)


def _training_worker(tmp: str, scenarios: list[list[Any]]) -> None:
    import math

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from learner.config import LearnerModelConfig
    from learner.model.build import build_model, unwrap
    from learner.model.hf_config import load_hf_arch
    from learner.model.load import load_hf_weights
    from learner.parallel import current_layout, destroy_parallel, init_parallel

    device = init_worker_process_group()
    root = Path(tmp)
    if dist.get_rank() == 0:
        _save_tiny_qwen3(root / "untied", tie=False)
        _save_tiny_qwen3(root / "tied", tie=True)
    dist.barrier()

    for name, hf_dir, tp, pp, dtype, dist_opt, num_micro in scenarios:
        path = root / hf_dir
        cfg = LearnerModelConfig(hf_path=str(path), tp_size=tp, pp_size=pp, dtype=dtype)
        init_parallel(cfg)
        layout = current_layout()
        arch = load_hf_arch(path)
        model = build_model(arch, cfg)
        load_hf_weights(model, path, arch)
        config = unwrap(model).config
        config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt)
        model = DistributedDataParallel(config, ddp_config, model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=3e-3,
                weight_decay=0.0,
                clip_grad=0.5,
                bf16=dtype == "bf16",
                use_distributed_optimizer=dist_opt,
            ),
            [model],
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        # Each DP rank trains on its own data (the same across its TP/PP peers).
        gen = torch.Generator().manual_seed(100 + layout.dp_rank)
        ids = torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=gen).to(device)
        losses, norms = _train(model, optimizer, ids, num_micro, arch.vocab_size)

        assert all(math.isfinite(n) and n > 0 for n in norms), f"{name}: grad norms {norms}"
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == len(before), f"{name}: unchanged params {set(before) - set(changed)}"
        if parallel_state.is_pipeline_last_stage():
            assert losses[-1] < losses[0], f"{name}: loss did not decrease: {losses}"
        if layout.dp_size > 1:  # DP replicas must stay identical after the (distributed) optimizer step
            for n, p in model.named_parameters():
                other = p.detach().clone()
                dist.all_reduce(other, group=parallel_state.get_data_parallel_group())
                assert torch.allclose(other, 2 * p, atol=0, rtol=0), f"{name}: {n} differs between DP ranks"
        if name.startswith("tp"):  # megatron's sharded checkpoint of the TP-sharded model: save, perturb, load back
            ckpt = root / "ckpt"
            ckpt.mkdir(exist_ok=True)
            gpt = unwrap(model)
            dist_checkpointing.save(gpt.sharded_state_dict(), str(ckpt))
            saved = {n: p.detach().clone() for n, p in gpt.named_parameters()}
            with torch.no_grad():
                for p in gpt.parameters():
                    p.add_(1.0)
            gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), str(ckpt)))
            for n, p in gpt.named_parameters():
                assert torch.equal(p, saved[n]), f"dist_checkpointing round trip changed {n}"
        if dist.get_rank() == 0 or parallel_state.is_pipeline_last_stage():
            print(f"ok {name} rank{layout.rank} losses={[round(x, 4) for x in losses]}", flush=True)
        destroy_parallel(keep_process_group=True)
    destroy_parallel()


def test_megatron_ddp_optimizer_clip_pp_bf16_checkpoint_on_cpu(tmp_path: Path) -> None:
    """Guards learner.compat and the training foundations: megatron DDP + Adam + clip_grad at TP2, the
    distributed optimizer at DP2 (replicas stay identical), 1F1B at PP2 in bf16 (Float16Module) and
    dist_checkpointing all run on CPU and actually train (loss falls, every parameter moves)."""
    output = run_torchrun(
        2, f"{__name__}:_training_worker", {"tmp": str(tmp_path), "scenarios": SCENARIOS}, timeout_s=300
    )
    for name, *_ in SCENARIOS:
        assert f"ok {name}" in output, output[-3000:]


@pytest.mark.gpu
def test_megatron_training_foundations_on_gpu(tmp_path: Path) -> None:
    """Guards the same foundations on CUDA + NCCL (compat inactive), on the GPUs present."""
    import torch

    nproc = min(2, torch.cuda.device_count())
    scenarios = [s for s in SCENARIOS if s[2] * s[3] <= nproc and (nproc > 1 or "dp2" not in s[0])]
    scenarios.append(("tp1-bf16-distopt", "untied", 1, 1, "bf16", True, 2))
    output = run_torchrun(
        nproc, f"{__name__}:_training_worker", {"tmp": str(tmp_path), "scenarios": scenarios}, timeout_s=300
    )
    for name, *_ in scenarios:
        assert f"ok {name}" in output, output[-3000:]
