"""The processes of `longtrace bench learner-memory` and how they are launched (learner/bench_memory.py runs them
through `run_worker`; never by hand):

    python -m learner.bench_memory_worker make-model SPEC_JSON   # the HF Qwen3 directory the measurements load
    python -m learner.bench_memory_worker measure SPEC_JSON      # one training step, its peak RSS (one rank)

`measure` runs alone or as each rank of `torchrun --standalone --nproc_per_node N` (context parallelism): every
rank builds the model and optimizer from the TrainConfig in the spec, then takes a warm-up step and one measured `Learner.train_step` on a
batch of 2 sequences of `seq_len` tokens, and writes `<out_dir>/rank<R>.json` with its resident set size right
before the step and its high-water mark after it (MiB). Just before the step it resets the kernel's high-water
mark (`/proc/self/clear_refs`), so that what building the model reached cannot hide the step's peak; where the
reset is refused, `build_peak_masks_step` says whether the build's peak (`maxrss_before_mb`) hid the step's.

A warm-up step on a `WARMUP_TOKENS` batch comes first: it allocates Adam's two fp32 moments (`adam_state_mb`) and
the optimizer's buffers, which a run allocates once, so `peak_mb` is that of a steady-state step.

A worker that fails, times out or is killed (the OOM killer) is a reason string from `run_worker`, never a hang.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from common.config import BaseConfig
from common.net import free_port

PROMPT_FRACTION = 0.5
"""Share of each sequence that is prompt; the rest is response (the tokens the loss sees)."""
REWARDS = (1.0, 0.0)
"""The group: two samples with different rewards, so both advantages are non-zero (+-0.707)."""
REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP_TOKENS = 64
"""Length of the warm-up step's sequences (before the measured step)."""
MMAP_THRESHOLD_BYTES = 65536
"""glibc's M_MMAP_THRESHOLD in every worker (fixed: RSS then follows the live tensors within a few MiB)."""
TRACED_RANGES = ("forward_backward", "optimizer_step")
"""The record_function ranges of Learner.train_step whose tensor peaks a point reports."""


class ModelSpec(BaseConfig):
    """The transformers Qwen3Config of the bench model (written with save_pretrained into `path`)."""

    path: str
    vocab_size: int = Field(ge=16)
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    max_position_embeddings: int = Field(ge=2)


class MeasureSpec(BaseConfig):
    """One measurement: this TrainConfig (a plain dict, validated here), one step on `seq_len`-token sequences."""

    train_config: dict[str, Any]
    seq_len: int = Field(ge=4)
    out_dir: str
    threads: int = Field(ge=1)
    seed: int = 0


def _status_mb(key: str) -> float:
    """A `Vm*` line of /proc/self/status in MiB (the kernel writes kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def maxrss_mb() -> float:
    """The high-water mark of this process's resident set (VmHWM), MiB. Not getrusage's ru_maxrss: that one also
    keeps the peak folded in by every thread that has exited, which clear_refs cannot reset (a worker whose import
    or build ended a thread after its peak could then never measure a step below it)."""
    return _status_mb("VmHWM")


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak RSS of this process (Linux >= 4.0: `5` into clear_refs); whether it took."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return maxrss_mb() <= _status_mb("VmRSS") + 1.0


def make_model(spec: ModelSpec) -> None:
    """Random-initialised Qwen3 weights (untied embeddings) as a HF directory."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
    )
    Qwen3ForCausalLM(config).save_pretrained(spec.path)


def bench_batch(vocab_size: int, seq_len: int, seed: int) -> Any:
    """One GRPO group of 2 samples sharing a prompt of seq_len * PROMPT_FRACTION random tokens, each with its own
    random response up to seq_len tokens; engine logprobs at -log(vocab), what a freshly initialised model gives, so
    icepop keeps the tokens (the importance ratio is near 1) and the loss has a gradient everywhere."""
    import numpy as np
    import torch

    from learner.batching import TrainBatch, TrainSample
    from learner.loss import grpo_advantages

    rng = np.random.default_rng(seed)
    prompt_len = max(1, int(seq_len * PROMPT_FRACTION))
    prompt = rng.integers(0, vocab_size, size=prompt_len)
    samples = []
    for advantage in grpo_advantages(torch.tensor(REWARDS, dtype=torch.float64)).tolist():
        response = rng.integers(0, vocab_size, size=seq_len - prompt_len)
        rollout_logp = np.full(len(response), -math.log(vocab_size), dtype=np.float32)
        tokens = np.concatenate([prompt, response]).astype(np.int32)
        samples.append(TrainSample(tokens, prompt_len, rollout_logp, float(advantage)))
    return TrainBatch(samples, ["bench-memory"], {})


def measure(spec: MeasureSpec) -> dict[str, Any]:
    """Build this rank's model and optimizer, then one train_step; RSS before it and the peak during it (MiB)."""
    import torch

    torch.set_num_threads(spec.threads)
    from learner.alloc_trace import trace_allocations
    from learner.model.hf_config import load_hf_arch
    from learner.parallel import destroy_parallel, init_parallel
    from learner.train_config import TrainConfig
    from learner.train_step import Learner, build_model_and_optimizer

    cfg = TrainConfig.model_validate(spec.train_config)
    layout = init_parallel(cfg.model)
    arch = load_hf_arch(cfg.model.hf_path)
    model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=True)
    learner = Learner(cfg, arch, layout, model, optimizer)
    batch = bench_batch(arch.vocab_size, spec.seq_len, spec.seed)
    params = sum(p.numel() for p in model.parameters())
    # A first step on a short batch allocates what every later step finds in place (Adam's moments, the
    # optimizer's buffers): the measured step is a steady-state one, as all but the first of a run.
    learner.train_step(bench_batch(arch.vocab_size, WARMUP_TOKENS, spec.seed + 1))
    gc.collect()
    rss_before, maxrss_before = _status_mb("VmRSS"), maxrss_mb()
    reset = reset_high_water_mark()
    start = time.perf_counter()
    with trace_allocations(TRACED_RANGES) as allocated:
        metrics = learner.train_step(batch)
    step_s = time.perf_counter() - start
    maxrss_after = maxrss_mb()
    destroy_parallel()
    return {
        "rank": layout.rank,
        "rss_before_mb": round(rss_before, 1),
        "maxrss_before_mb": round(maxrss_before, 1),
        "maxrss_after_mb": round(maxrss_after, 1),
        "peak_mb": round(maxrss_after - rss_before, 1),
        # Tensor bytes (learner/alloc_trace.py): the step's own, without what the allocator keeps.
        "allocated_peak_mb": allocated.peak_mb,
        "activation_peak_mb": allocated.range_peak_mb["forward_backward"],
        "optimizer_peak_mb": allocated.range_peak_mb["optimizer_step"],
        "high_water_mark_reset": reset,
        # Without the reset, a build that reached higher than the step leaves the step's own peak unknown.
        "build_peak_masks_step": not reset and maxrss_after <= maxrss_before,
        "step_s": round(step_s, 2),
        "params": params,
        "adam_state_mb": round(2 * 4 * params / 2**20, 1),
        "num_micro_batches": metrics.get("num_micro_batches"),
        "loss": metrics.get("loss"),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- launching (the bench's side)


def worker_argv(nproc: int, task: str, spec: BaseConfig) -> list[str]:
    """The command of one worker: a plain process, or `nproc` torchrun ranks on this machine."""
    module = ["-m", "learner.bench_memory_worker", task, spec.model_dump_json()]
    if nproc == 1:
        return [sys.executable, *module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module]


def _error_line(output: str) -> str:
    """The line naming the error (`XError: ...`), else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^(\[\w+\]:?\s*)?[\w.]*(Error|Exception)\b.*:", line)]
    return (errors or lines or ["(no output)"])[-1][-400:]


_DIST_VARS = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT"}
    | {"TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"}
)


def run_worker(argv: list[str], log: Path, timeout_s: float, threads: int) -> str | None:
    """Run a worker command to its end, its output into `log`; None on success, else why it failed."""
    # A caller's distributed variables (a test process that joined a group, a torchrun rank) must not make a
    # one-process worker join a world that is not there: it gets its own rendezvous on a free port.
    inherited = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env = {
        **inherited,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONWARNINGS": "ignore",  # megatron warns about apex/TE at import
        "HF_HUB_OFFLINE": "1",
        # Every block over 64 KiB its own mmap, unmapped when freed: glibc's dynamic threshold (up to 32 MiB) would
        # keep freed activations in its heap, and the RSS peak would measure the allocator more than the step.
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
    }
    with log.open("w") as out:
        # Its own session, so that a timeout kills torchrun's ranks with it.
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on Ctrl-C: no worker outlives the bench
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc == 0:
        return None
    output = log.read_text(errors="replace")
    if rc is None:
        return f"timed out after {timeout_s:g} s (--timeout_s)"
    # torchrun exits 1 when a rank dies; its summary names the signal.
    if rc == -signal.SIGKILL or "Signal 9 (SIGKILL)" in output:
        return "killed by SIGKILL: out of memory (the kernel's OOM killer), most likely"
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit {rc}: {_error_line(output)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("make-model", "measure"):
        print("usage: python -m learner.bench_memory_worker {make-model|measure} SPEC_JSON", file=sys.stderr)
        return 2
    if args[0] == "make-model":
        make_model(ModelSpec.model_validate_json(args[1]))
        return 0
    spec = MeasureSpec.model_validate_json(args[1])
    result = measure(spec)
    out = Path(spec.out_dir) / f"rank{os.environ.get('RANK', '0')}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)  # whole or absent: a rank killed mid-write leaves no half result
    return 0


if __name__ == "__main__":
    sys.exit(main())
