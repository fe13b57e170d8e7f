"""Run megatron-core on a machine without CUDA: redirect its hard-coded CUDA calls to the CPU.

megatron-core assumes a GPU in a handful of places (device arguments, RNG, type-name checks,
synchronize). Rather than forking those code paths, importing this module makes the `torch.cuda`
surface megatron touches behave like the CPU, so megatron's own DDP, optimizers (incl. the
distributed optimizer), grad clipping, RNG tracker, pipeline schedules and dist_checkpointing run
unchanged over gloo. Every learner module imports it before megatron. It does nothing when CUDA is
present, so the GPU path is megatron as shipped; nothing else in the code base special-cases the CPU.

Side effects while active (CPU only): a TorchFunctionMode rewrites CUDA device arguments to "cpu"
and makes `Tensor.type()` of a CPU float tensor report the CUDA type name. Torch function modes are
per thread: it is entered for the importing (main) thread; another thread that calls megatron wraps
its work in `device_mode()`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ACTIVE = False

# Tensor.type() names megatron compares against ("torch.cuda.FloatTensor", ...), keyed by dtype.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal (megatron passes torch.cuda.current_device()); bool is not a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU and reports CUDA type names for CPU float tensors.

    Unblocks: `device=torch.cuda.current_device()` allocations (every parallel linear/embedding, the
    attention softmax mask and matmul buffer, the DDP grad/param buffers, p2p receive buffers),
    `torch.tensor(..., device='cuda')` in the optimizers, clip_grads and dist_checkpointing,
    RoPE's `inv_freq.to(torch.cuda.current_device())`, `.cuda()` in GPTModel's tied-embedding setup, the
    `pin_memory=True` of RoPE's context-parallel slice (dropped: CPU-only torch has no pinned allocator),
    and the `param.type() == 'torch.cuda.FloatTensor'` checks of get_megatron_optimizer, the
    (distributed) optimizers and clip_grads.
    """

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # page-locked memory needs CUDA's host allocator; only a copy speed-up
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


def device_mode() -> contextlib.AbstractContextManager[object]:
    """The device rewrite for a thread other than the one that imported this module (no-op with CUDA)."""
    return _CpuDeviceMode() if _ACTIVE else contextlib.nullcontext()


def _synchronize(device: torch.types.Device = None) -> None:
    """CPU work is synchronous: nothing to wait for."""


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    """Map the torch.cuda functions megatron calls to CPU equivalents (CPU-only torch raises on them)."""
    cuda = torch.cuda
    # Every layer, DDP, p2p and dist_checkpointing ask for the current device (its 0 is rewritten to cpu above).
    cuda.current_device = lambda: 0
    # p2p_communication (batched send/recv) and dist_checkpointing's writers synchronise; CPU work is synchronous.
    cuda.synchronize = _synchronize
    # model_parallel_cuda_manual_seed and RNG-tracker.add seed and read "the CUDA generator": use the CPU one.
    # (CPU-only torch would queue cuda.manual_seed forever, silently never seeding; torch.manual_seed itself
    # calls cuda.manual_seed_all, so that one stays as it is.)
    cuda.manual_seed = _seed_cpu_generator
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()


def _patch_megatron_rng() -> None:
    """Point megatron's tensor-parallel RNG tracker (its fork() around init and dropout) at the CPU generator."""
    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device: torch.types.Device = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()  # always a fresh copy

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state


def _backward_in_device_mode(classes: Iterable[type[torch.autograd.Function]]) -> None:
    """Run each autograd Function's backward inside the device mode: torch runs backward functions without the
    forward's function modes, so a backward that allocates on "cuda" would miss the redirection."""
    for cls in classes:
        original = cls.backward

        def backward(ctx: Any, *args: Any, _original: Callable[..., Any] = original) -> Any:
            with _CpuDeviceMode():
                return _original(ctx, *args)

        cls.backward = staticmethod(backward)  # type: ignore[method-assign]


def _patch_megatron_recompute() -> None:
    """Activation recompute re-runs layers inside autograd's backward: the device mode must be in force there."""
    from megatron.core.tensor_parallel import random as tp_random

    classes = (tp_random.CheckpointFunction, getattr(tp_random, "CheckpointWithoutOutputFunction", None))
    _backward_in_device_mode(cls for cls in classes if cls is not None)


def _patch_megatron_collective_backward() -> None:
    """The backward of megatron's sequence-parallel collectives (the MoE token dispatcher's all-gather and
    reduce-scatter) allocates its output on "cuda", like recompute."""
    from megatron.core.tensor_parallel import mappings

    _backward_in_device_mode(
        cls
        for cls in vars(mappings).values()
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls.__module__ == mappings.__name__
    )


def activate() -> bool:
    """Install the CPU redirections once if CUDA is absent; return whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    # Entered for the life of the process: megatron allocates on "cuda" at any time (DDP buffers, optimizer).
    _CpuDeviceMode().__enter__()  # type: ignore[no-untyped-call]  # torch leaves TorchFunctionMode.__enter__ unannotated
    _patch_megatron_rng()
    _patch_megatron_recompute()
    _patch_megatron_collective_backward()
    _ACTIVE = True
    logger.debug("CUDA absent: megatron-core's CUDA calls redirected to the CPU")
    return True


activate()
