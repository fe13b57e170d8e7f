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

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

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
