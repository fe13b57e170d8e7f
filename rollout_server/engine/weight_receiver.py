"""The engine's side of the weight-update groups (built as SGLang builds them, weights/group.py): join,
receive broadcast tensors straight into the model's parameters while paused, destroy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from weights.group import init_custom_process_group, run_with_timeout

log = logging.getLogger(__name__)


class WeightReceiver:
    """The engine's side of its weight-update groups: join, receive broadcast tensors, destroy."""

    def __init__(self) -> None:
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.backends: dict[str, str] = {}
        self.broken: dict[str, str] = {}

    def join(
        self,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        group_name: str,
        backend: str,
        timeout_s: float,
    ) -> None:
        if group_name in self.groups:
            raise ValueError(f"weight update group {group_name!r} already exists; destroy it first")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend nccl needs CUDA; use gloo on CPU")
        init_method = f"tcp://{master_address}:{master_port}"
        parts = urlsplit(init_method)  # .port raises ValueError itself when out of range
        if not parts.hostname or parts.port is None:  # torch's rendezvous would only assert
            raise ValueError(f"master_address {master_address!r} with port {master_port} is not a host:port")
        self.groups[group_name] = run_with_timeout(
            lambda: init_custom_process_group(backend, init_method, world_size, rank, group_name, timeout_s),
            timeout_s + 5.0,
            f"joining weight update group {group_name!r} at {init_method} as rank {rank}/{world_size}",
        )
        self.backends[group_name] = backend
        self.broken.pop(group_name, None)
        log.info(
            "joined weight update group %r at %s as rank %d/%d (%s)", group_name, init_method, rank, world_size, backend
        )

    def receive(
        self,
        group_name: str,
        dtypes: Sequence[torch.dtype],
        shapes: Sequence[Sequence[int]],
        device: torch.device,
        timeout_s: float,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Receive one broadcast from rank 0 per tensor, in order, into `out` when given (the parameters
        themselves: no allocation, no copy), else into new tensors; the group is marked broken on timeout."""
        group = self.group(group_name)
        if self.backends[group_name] == "gloo":
            device = torch.device("cpu")
        if out is not None:
            tensors = list(out)
        else:
            tensors = [torch.empty(tuple(s), dtype=d, device=device) for d, s in zip(dtypes, shapes, strict=True)]

        def recv() -> None:
            handles = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
            for h in handles:
                assert h is not None
                h.wait()

        try:
            run_with_timeout(recv, timeout_s, f"receiving {len(tensors)} tensors on {group_name!r}")
        except Exception as e:
            self.broken[group_name] = repr(e)
            raise
        return tensors

    def group(self, group_name: str) -> dist.ProcessGroup:
        if group_name not in self.groups:
            raise ValueError(f"no weight update group {group_name!r}: call /init_weights_update_group first")
        if group_name in self.broken:
            raise ValueError(
                f"weight update group {group_name!r} is broken ({self.broken[group_name]}); destroy and re-init it"
            )
        return self.groups[group_name]

    def destroy(self, group_name: str) -> None:
        group = self.groups.pop(group_name, None)
        self.backends.pop(group_name, None)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}")
        broken = self.broken.pop(group_name, None)
        if broken is None:  # a group stuck in a collective cannot be torn down cleanly; drop it
            dist.destroy_process_group(group)
        log.info("destroyed weight update group %r", group_name)
