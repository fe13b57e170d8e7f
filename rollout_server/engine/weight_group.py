"""The weight-update process group shared by a trainer (rank 0) and engines, built the way SGLang builds it.

SGLang's engines join with `init_custom_process_group`: a rendezvous store at `init_method`, wrapped
in `PrefixStore(group_name)`, and a new process group from `_new_process_group_helper`. A group made
with `torch.distributed.init_process_group` uses a differently prefixed store and never meets them, so
the learner's sender (rank 0) imports this same function. The engine joins at rank = rank_offset.

A broadcast has no timeout of its own: `run_with_timeout` runs a blocking collective on a daemon
thread and gives up waiting after a deadline, so a dead peer cannot hang the engine; the group is
then marked broken and must be destroyed and rebuilt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")


def init_custom_process_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Create (or join) the process group `group_name` of `world_size` ranks at `init_method` (tcp://host:port).

    Rank 0 hosts the rendezvous store. Works without a default process group. The store and the
    group's collectives use `timeout_s` (gloo enforces it; NCCL collectives may still block, hence
    `run_with_timeout`).

    The TCPStore is built here, not by torch's `rendezvous(tcp://...)` as SGLang does: under torchrun
    (TORCHELASTIC_USE_AGENT_STORE=True) that rendezvous makes every rank a client of the elastic agent's
    store, so rank 0 (the learner) would host nothing and the engines' connections would time out. This
    group is not torchrun's: its rank 0 always hosts the store, whatever the environment says.
    """
    from torch._C._distributed_c10d import TCPStore
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    parts = urlsplit(init_method)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"init_method {init_method!r} must be tcp://host:port")
    timeout = timedelta(seconds=timeout_s)
    # As torch's tcp:// rendezvous does without an agent store: multi_tenant lets several groups of this
    # process share one port; the host waits (up to `timeout`) for every rank to connect.
    store = TCPStore(parts.hostname, parts.port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    prefixed = PrefixStore(group_name, store)
    new_group: Any = _new_process_group_helper  # private helper; group_name is a NewType of str
    group: dist.ProcessGroup
    group, _ = new_group(world_size, rank, [], Backend(backend), prefixed, group_name=group_name, timeout=timeout)
    # Register it so torch.distributed collectives accept it: group rank == global rank in this group.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def run_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run a blocking call on a daemon thread; raise TimeoutError if it has not returned after `timeout_s`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed back to the caller below
            box["error"] = e

    thread = threading.Thread(target=target, name=f"weight-sync: {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16 (SGLang sends dtype names as strings)."""
    attr = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(attr, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return attr


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
