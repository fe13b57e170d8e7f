"""learner.compat in fresh interpreters: it must redirect megatron's CUDA calls on CPU and do nothing with CUDA.

A subprocess each, because the redirection is process-wide and must not leak into the pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers.dist import REPO_ROOT

_CPU_CHECKS = """
import threading
import torch
from learner import compat
from megatron.core.tensor_parallel import random as tp_random

assert compat.activate() is True
# Device arguments megatron passes: current_device() (an int), "cuda", torch.device("cuda"), .cuda(), .to("cuda").
assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
assert torch.tensor([1.0], device="cuda").device.type == "cpu"
assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
x = torch.ones(2)
assert x.cuda() is x and x.to("cuda").device.type == "cpu" and x.to(torch.float64).dtype == torch.float64
# The type-name checks of the optimizers and clip_grads; conversion through .type(dtype) still converts.
assert x.type() == "torch.cuda.FloatTensor" and x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
assert x.type(torch.float64).dtype == torch.float64 and torch.ones(2, dtype=torch.long).type() == "torch.LongTensor"
torch.cuda.synchronize()
# The RNG tracker: seeded, reproducible forks that leave the default stream where it was.
tp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
base = torch.get_rng_state()
tracker = tp_random.get_cuda_rng_tracker()
with tracker.fork():
    a = torch.rand(4)
assert torch.equal(torch.get_rng_state(), base), "fork() moved the default RNG"
tp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
with tracker.fork():
    b = torch.rand(4)
assert torch.equal(a, b), "the tensor-parallel RNG is not seeded"
default = torch.rand(4)
tp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
assert torch.equal(torch.rand(4), default) and not torch.equal(default, a)
# The mode is per thread: device_mode() gives it to a worker thread.
errors = []
def worker():
    with compat.device_mode():
        errors.append(torch.empty(1, device="cuda").device.type)
t = threading.Thread(target=worker); t.start(); t.join()
assert errors == ["cpu"], errors
print("compat ok")
"""

_CUDA_PRESENT = """
import torch
original = torch.cuda.current_device
torch.cuda.is_available = lambda: True  # pretend a GPU: compat must leave torch and megatron untouched
from learner import compat
assert compat.activate() is False
assert torch.cuda.current_device is original
assert torch._C._len_torch_function_stack() == 0, "a torch function mode was entered"
print("inert ok")
"""


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_compat_redirects_megatron_cuda_calls_on_cpu() -> None:
    """Guards each redirection megatron needs on CPU (device args, .cuda(), Tensor.type names, synchronize,
    the seeded and state-preserving RNG tracker, worker threads) against a torch or megatron upgrade."""
    assert "compat ok" in _run(_CPU_CHECKS)


def test_compat_is_inert_when_cuda_is_present() -> None:
    """Guards the GPU path: with CUDA present, importing compat must patch nothing and enter no mode."""
    assert "inert ok" in _run(_CUDA_PRESENT)
