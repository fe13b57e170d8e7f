"""The weight-update process group shared by a trainer (rank 0) and engines, built the way SGLang builds it.

SGLang's engines join with `init_custom_process_group`: a rendezvous store at `init_method`, wrapped
in `PrefixStore(group_name)`, and a new process group from `_new_process_group_helper`. A group made
with `torch.distributed.init_process_group` uses a differently prefixed store and never meets them, so
the learner's sender (rank 0) imports this same function. The engine joins at rank = rank_offset.

A broadcast has no timeout of its own: `run_with_timeout` runs a blocking collective on a daemon
thread and gives up waiting after a deadline, so a dead peer cannot hang the engine; the group is
then marked broken and must be destroyed and rebuilt.

Timeouts, in the order they must fire when a member dies mid-broadcast (docs/reliability.md, "Weight sync"):
 1. `timeout_s`: the rendezvous (every member connects to rank 0's store), the group's build.
 2. the caller's deadline on each broadcast (`run_with_timeout`; the learner's `broadcast_timeout_s`): the
    caller gives up first, and on NCCL aborts the group (`abort_group`) so nothing is left running in it.
 3. `collective_timeout_s`, the group's own timeout (the NCCL watchdog's, gloo's): later than 2, only a
    backstop for work nobody aborted.
 4. the NCCL watchdog's reaction, per group: an NCCL group is built with TORCH_NCCL_ASYNC_ERROR_HANDLING=2
    (CleanUpOnly: abort the group's communicators, keep the process), whatever the process's own groups use (3
    tears the process down so torchrun restarts the job: right for the learner's TP/DP groups, wrong for a group
    shared with engines that may die). The process must run with TORCH_NCCL_DUMP_ON_TIMEOUT=0: with it on, any
    group's error raises a process-wide dump flag on which the default group's heartbeat monitor kills the
    process TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC later (`nccl_watchdog_problems` says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
GROUP_ERROR_HANDLING = "2"
"""The weight-update group's TORCH_NCCL_ASYNC_ERROR_HANDLING: CleanUpOnly, abort its communicators on an error or
a timeout and keep the process (ProcessGroupNCCL reads it when the group is constructed)."""
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """`name` = `value` in this process's environment for the block (one block at a time)."""
    with _ENV_LOCK:
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            yield
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before


def nccl_watchdog_problems(environ: dict[str, str] | None = None) -> list[str]:
    """What in the environment lets an NCCL weight-update group's failure kill this process (see the module doc)."""
    env = os.environ if environ is None else environ
    if env.get("TORCH_NCCL_ENABLE_MONITORING", "1") == "0" or env.get("TORCH_NCCL_DUMP_ON_TIMEOUT", "1") == "0":
        return []
    return [
        "TORCH_NCCL_DUMP_ON_TIMEOUT is not 0: an engine dying mid-broadcast makes the weight-update group's watchdog "
        "raise the process-wide dump flag, and the default group's heartbeat monitor then kills this process "
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC later; set TORCH_NCCL_DUMP_ON_TIMEOUT=0 (deploy/torchrun/nccl.sh does)"
    ]


def nccl_version() -> str | None:
    """This process's NCCL release, e.g. "2.30.7"; None where torch has none (a CPU build)."""
    try:
        version = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    except (AttributeError, RuntimeError):  # CPU torch lacks the binding
        return None
    return ".".join(str(part) for part in version[:3])


def nccl_versions_note() -> str:
    """The NCCL releases a failed NCCL weight-update group may owe to. SGLang reports no NCCL version (its
    /get_server_info has none), so the engines' side is what the pinned engine image runs."""
    from weights.sglang_release import ENGINE_IMAGE, ENGINE_NCCL_VERSION

    return (
        f"NCCL here {nccl_version() or 'unknown'}, SGLang engines from {ENGINE_IMAGE} NCCL {ENGINE_NCCL_VERSION}, "
        "the built-in engine its own (its /get_server_info nccl_version): NCCL refuses a communicator whose "
        "members run different releases"
    )


def init_custom_process_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 600.0,
    collective_timeout_s: float | None = None,
) -> dist.ProcessGroup:
    """Create (or join) the process group `group_name` of `world_size` ranks at `init_method` (tcp://host:port).

    Rank 0 hosts the rendezvous store. Works without a default process group. The store waits `timeout_s` for
    every rank; the group's collectives time out after `collective_timeout_s` (default `timeout_s`), which
    must be later than the caller's own deadline on them (`run_with_timeout`): gloo raises then, NCCL's
    watchdog aborts the group (CleanUpOnly, see the module doc).

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
    new_group: Any = _new_process_group_helper  # private helper; group_name is a NewType of str
    group: dist.ProcessGroup
    collective_timeout = timedelta(seconds=timeout_s if collective_timeout_s is None else collective_timeout_s)
    try:
        # As torch's tcp:// rendezvous does without an agent store: multi_tenant lets several groups of this
        # process share one port; the host waits (up to `timeout`) for every rank to connect.
        store = TCPStore(
            parts.hostname, parts.port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True
        )
        prefixed = PrefixStore(group_name, store)
        # ProcessGroupNCCL reads the error handling when it is constructed: this group's, not the process's.
        with _env(ERROR_HANDLING_ENV, GROUP_ERROR_HANDLING) if backend == "nccl" else contextlib.nullcontext():
            group, _ = new_group(
                world_size, rank, [], Backend(backend), prefixed, group_name=group_name, timeout=collective_timeout
            )
    except Exception as e:
        if backend != "nccl":
            raise
        # The NCCL communicator itself is built lazily, at the first collective: a version mismatch shows there,
        # but a member that never joined (it could not load the group) also lands here. Name both releases.
        raise RuntimeError(f"{type(e).__name__}: {e} ({nccl_versions_note()})") from e
    # Register it so torch.distributed collectives accept it: group rank == global rank in this group.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def abort_group(group: dist.ProcessGroup, what: str) -> None:
    """Abort `group`'s communicators so a collective a caller gave up on stops (NCCL: its kernels exit, the thread
    waiting in it returns); gloo cannot abort a collective in flight, its own timeout ends it. Never raises."""
    try:
        group.abort()
    except Exception as e:  # best effort: the group is dropped either way
        log.warning("aborting %s: %r", what, e)


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
