"""Rank 0 of one pipeline stage's weight-update group: build it with the engines, send buckets, tear it down.

The group is built the way SGLang joins it (`init_custom_process_group`: a rendezvous store wrapped in
`PrefixStore(group_name)`), never with `init_process_group`, whose store prefix never meets the engines'.
World size = 1 + the engines' ranks (every GPU of each: `EngineRef.ranks`); engine i joins at rank_offset = 1 +
the ranks before it.

Per bucket: post `/update_weights_from_distributed` to every engine without waiting, broadcast the bucket's
tensors from rank 0 on a worker thread, then collect the replies. A broadcast has no timeout of its own, so
the caller's thread watches it: it gives up after `broadcast_timeout_s`, or as soon as an engine's request
fails (that engine will never receive, and the others cannot finish the bucket). A group that failed is
never used again: it is dropped (and destroyed once no thread is inside it) and rebuilt at the next attempt.

Why an engine dying mid-broadcast cannot take rank 0 down (NCCL; the settings are deliberate, in this order):
 1. `init_timeout_s` (120 s): the rendezvous and the engines' joins; the build gives up after 2x that + 15 s.
 2. `broadcast_timeout_s` (300 s), or at once when an engine's request fails: rank 0 gives up on the bucket
    first, aborts the group's communicators (`abort_group`: the broadcast thread returns, no NCCL work is left
    behind) and destroys it; dead engines are dropped and the survivors get the whole update again.
 3. the group's own collective timeout, `broadcast_timeout_s + WATCHDOG_GRACE_S`: the NCCL watchdog only ever
    sees work rank 0 did not abort, and then (4) aborts the group without killing the process.
 4. the group is built with TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (weights/group.py), the learner's own groups keep
    3 (tear down: torchrun restarts the job), and the learner runs with TORCH_NCCL_DUMP_ON_TIMEOUT=0 and
    TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=600 (deploy/torchrun/nccl.sh, deploy/compose): with the dump on, any group's
    error makes the default group's heartbeat monitor kill the process; the heartbeat timeout must exceed the
    watchdog's wait before an abort (4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC, 60 s) plus the abort itself.
 5. the learner's `model.dist_timeout_s` (its other ranks wait in object collectives during a push) must exceed
    one attempt's worst case, `DistributedSyncConfig.attempt_bound_s` (TrainConfig refuses less): otherwise a
    hung engine times out the learner's own group.
Gloo has no watchdog: a dead peer's broadcast fails at once (connection reset); a hung one's thread stays until
the collective timeout (gloo cannot abort a collective in flight), and the group is dropped without destroying.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from common.config import ConfigError
from learner.weight_sync.config import DistributedSyncConfig
from weights.engine_client import EngineCallError, EngineClient, wait_all
from weights.group import abort_group, nccl_watchdog_problems

logger = logging.getLogger(__name__)

WATCHDOG_GRACE_S = 60.0
"""The weight-update group's own collective timeout is `broadcast_timeout_s` plus this: the NCCL watchdog (and gloo)
fire only after rank 0's deadline, which aborts the group itself."""
ABORT_JOIN_S = 10.0
"""After aborting a group, how long to wait for the thread stuck in its collective to return before giving up on
destroying the group (it is then dropped as stuck)."""


@dataclass(frozen=True, order=True)
class EngineRef:
    """An engine as a group member: its URL and how many ranks it adds to the group (every GPU it runs on:
    weights/sglang_release.py `engine_ranks`)."""

    url: str
    ranks: int = 1


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise ValueError("--weight_sync.backend nccl needs CUDA; use gloo (or auto) on CPU")
    return name


def resolve_address(address: str) -> str:
    return socket.gethostbyname(socket.getfqdn()) if address == "auto" else address


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind(("" if host in ("127.0.0.1", "localhost") else host, 0))
        return int(s.getsockname()[1])


class GroupFailed(RuntimeError):
    """The group could not be built, or a bucket did not reach every engine; the group is dropped.

    `culprits` are the engines whose own request failed (refused, unreachable, timed out after the broadcast);
    the other members only lost the group and can be retried. No culprit means the broadcast itself failed or
    timed out with nobody to blame.
    """

    def __init__(self, reason: str, culprits: dict[str, str]) -> None:
        super().__init__(reason + "".join(f"; {url}: {why}" for url, why in culprits.items()))
        self.culprits = culprits


class StageGroup:
    """The weight-update group of one pipeline stage, held by that stage's leader (group rank 0)."""

    def __init__(self, cfg: DistributedSyncConfig, client: EngineClient, stage: int) -> None:
        self.cfg = cfg
        self.client = client
        self.stage = stage
        self.backend = resolve_backend(cfg.backend)
        self.address = resolve_address(cfg.master_address)
        try:  # the group's store listens here: an address of another host fails every push, so fail at the start
            free_port(self.address)
        except OSError as e:
            raise ConfigError(
                f"--weight_sync.master_address {cfg.master_address!r} ({self.address}): this node cannot listen on "
                f"it ({e.strerror}). The engines join the weight-update group there: give an address of this node "
                "that every engine reaches (deploy/torchrun/learner.sh: WEIGHT_SYNC_ADDR, else NODE_ADDR)"
            ) from e
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        self.engines: tuple[EngineRef, ...] = ()
        self.name = ""
        self.generation = 0
        # A restarted learner must not collide with the groups its previous life left on the engines.
        self._token = uuid.uuid4().hex[:8]
        self._group: dist.ProcessGroup | None = None
        self._stale: list[tuple[str, tuple[EngineRef, ...]]] = []  # groups to destroy on their engines

    @property
    def process_group(self) -> dist.ProcessGroup:
        assert self._group is not None, "build the group first"
        return self._group

    def matches(self, engines: Sequence[EngineRef]) -> bool:
        return self._group is not None and tuple(engines) == self.engines

    # ------------------------------------------------------------------ build / drop

    def _check_nccl_versions(self, engines: Sequence[EngineRef]) -> None:
        """Fail fast, naming both releases, when an engine's NCCL differs from this process's (weights/sglang_release)."""
        from weights.group import nccl_version
        from weights.sglang_release import nccl_mismatch

        ours = nccl_version()
        culprits: dict[str, str] = {}
        for e in engines:
            try:
                info = self.client.server_info(e.url)
            except EngineCallError as err:
                logger.info("NCCL version of %s unknown: %s", e.url, err)
                continue
            if problem := nccl_mismatch(ours, info):
                culprits[e.url] = problem
        if culprits:
            raise GroupFailed("; ".join(f"{url}: {why}" for url, why in culprits.items()), culprits)

    def build(self, engines: Sequence[EngineRef]) -> None:
        """Drop the current group and build a new one with `engines`.

        Raises GroupFailed naming the engines that refused or never joined; then no group is kept (a gloo or
        NCCL group needs every member).
        """
        self.drop()
        self.generation += 1
        name = f"{self.cfg.group_name}_{self._token}_pp{self.stage}_g{self.generation}"
        port = self.cfg.master_port + self.stage if self.cfg.master_port else free_port(self.address)
        world_size = 1 + sum(e.ranks for e in engines)
        offsets = [1 + sum(e.ranks for e in engines[:i]) for i in range(len(engines))]
        stale: dict[str, list[str]] = {}
        for old, members in self._stale:
            for m in members:
                stale.setdefault(m.url, []).append(old)

        def join(engine: EngineRef, offset: int) -> None:
            for old in stale.get(engine.url, []):  # waits until the engine gave up on the failed group's broadcast
                try:
                    self.client.call(
                        engine.url, "/destroy_weights_update_group", {"group_name": old}, self.cfg.init_timeout_s
                    )
                except EngineCallError as e:
                    logger.info("stale group %r on %s: %s", old, engine.url, e)
            body = {
                "master_address": self.address,
                "master_port": port,
                "rank_offset": offset,
                "world_size": world_size,
                "group_name": name,
                "backend": self.backend,
            }
            self.client.call(engine.url, "/init_weights_update_group", body, timeout_s=self.cfg.init_timeout_s + 10)

        if self.backend == "nccl":
            for problem in nccl_watchdog_problems():
                logger.warning("weight sync: %s", problem)
            self._check_nccl_versions(engines)
        futures = {e.url: self.client.submit(join, e, off) for e, off in zip(engines, offsets, strict=True)}
        from weights.group import init_custom_process_group

        group_box: dict[str, Any] = {}

        def rendezvous() -> None:  # rank 0 hosts the group's store, under torchrun too (see weights/group.py)
            group_box["group"] = init_custom_process_group(
                self.backend,
                f"tcp://{self.address}:{port}",
                world_size,
                0,
                name,
                self.cfg.init_timeout_s,
                collective_timeout_s=self.cfg.broadcast_timeout_s + WATCHDOG_GRACE_S,
            )

        where = f"tcp://{self.address}:{port}"
        error, _ = self._guarded(
            rendezvous, futures, 2 * self.cfg.init_timeout_s + 15, f"building group {name!r} at {where}"
        )
        if error is not None and not any(f.done() and f.exception() is not None for f in futures.values()):
            error += f" (the engines join at {where}: do they all reach --weight_sync.master_address {self.address}?)"
        if error is None:  # the group exists on our side, so every engine's join returns now
            _, culprits = wait_all(futures, self.cfg.init_timeout_s + 15)
        else:  # the engines that failed first are to blame; the others wait for a world that never completes
            culprits = {url: _why(f) for url, f in futures.items() if f.done() and f.exception() is not None}
        self._stale = []  # every engine of the new set was asked to destroy its stale groups; the others are gone
        if error or culprits:
            if "group" in group_box:
                dist.destroy_process_group(group_box["group"])
            self._stale.append((name, tuple(engines)))
            raise GroupFailed(error or f"building group {name!r} failed", culprits)
        self._group = group_box["group"]
        self.engines = tuple(engines)
        self.name = name
        logger.info(
            "weight-update group %r (%s, world %d) built at %s:%d with %s",
            name, self.backend, world_size, self.address, port, [e.url for e in engines],
        )  # fmt: skip

    def drop(self, stuck: bool = False) -> None:
        """Forget the group locally (destroyed unless a thread is `stuck` in it); its engines destroy theirs at the
        next build, once they gave up on it."""
        if self._group is not None:
            if not stuck:
                dist.destroy_process_group(self._group)
            self._stale.append((self.name, self.engines))
        self._group = None
        self.engines = ()
        self.name = ""

    def close(self) -> None:
        """Destroy the group here and on its engines (best effort, bounded)."""
        members = self.engines
        name = self.name
        self.drop()
        if name:
            self.client.for_all([e.url for e in members], lambda url: self.client.destroy_group(url, name), 10.0)
        self._stale.clear()

    # ------------------------------------------------------------------ buckets

    def send_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]], flush_cache: bool) -> None:
        """Post the bucket's metadata to every engine, broadcast its tensors, await the replies.

        Raises GroupFailed (and drops the group) unless every engine loaded the bucket.
        """
        assert self._group is not None, "build the group first"
        group = self._group
        tensors = [self._prepare(t) for _, t in bucket]
        body = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
            "shapes": [list(t.shape) for t in tensors],
            "group_name": self.name,
            "flush_cache": flush_cache,
            "abort_all_requests": False,
        }
        timeout_s = self.cfg.update_timeout_s
        path = "/update_weights_from_distributed"
        futures = {e.url: self.client.submit(self.client.call, e.url, path, body, timeout_s) for e in self.engines}

        def broadcast() -> None:
            if self.device is not None:  # a new thread starts on GPU 0, whatever this rank's GPU is
                torch.cuda.set_device(self.device)
            handles = [dist.broadcast(t, group=group, group_src=0, async_op=True) for t in tensors]
            for h in handles:
                assert h is not None
                h.wait()
            if self.device is not None:
                torch.cuda.current_stream().synchronize()

        what = f"broadcast on {self.name!r}"
        error, stuck = self._guarded(broadcast, futures, self.cfg.broadcast_timeout_s, what, group)
        if error is None:  # every engine got the tensors; now each loads them and answers
            _, culprits = wait_all(futures, timeout_s + 5)
            if not culprits:
                return
            error = "engines failed to load the bucket"
        else:  # the engines whose request failed first are to blame; the others wait for tensors that never come
            culprits = {url: _why(f) for url, f in futures.items() if f.done() and f.exception() is not None}
        self.drop(stuck)
        raise GroupFailed(error, culprits)

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        if self.device is not None and t.device != self.device:
            t = t.to(self.device)
        return t if t.is_contiguous() else t.contiguous()

    def _guarded(
        self,
        fn: Any,
        futures: dict[str, Future[Any]],
        timeout_s: float,
        what: str,
        group: dist.ProcessGroup | None = None,
    ) -> tuple[str | None, bool]:
        """Run a blocking collective on a daemon thread; return (None when it finished, else why we gave up;
        whether the thread is still inside the collective).

        Gives up after `timeout_s`, or early when an engine's request failed: a peer that will never take
        part makes the collective wait for nothing (NCCL forever). Giving up on a collective in `group`
        aborts the group (NCCL), so the thread returns and no work is left for the watchdog.
        """
        box: dict[str, BaseException] = {}

        def target() -> None:
            try:
                fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e

        thread = threading.Thread(target=target, name=f"weight-sync {what}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while True:
            thread.join(0.02)
            if not thread.is_alive():
                break
            failed = [url for url, f in futures.items() if f.done() and f.exception() is not None]
            if failed:
                return f"{what} abandoned: {', '.join(failed)} failed", self._abandon(thread, group, what)
            if time.monotonic() > deadline:
                return f"{what} did not finish within {timeout_s:g}s", self._abandon(thread, group, what)
        if "error" in box:
            return f"{what} failed: {box['error']}", False
        return None, False

    def _abandon(self, thread: threading.Thread, group: dist.ProcessGroup | None, what: str) -> bool:
        """Abort `group` under a collective given up on (NCCL: the thread returns); whether the thread is still in it."""
        if group is not None and self.backend == "nccl":
            abort_group(group, what)
            thread.join(ABORT_JOIN_S)
        return thread.is_alive()


def _why(f: Future[Any]) -> str:
    e = f.exception()
    return str(e) if e is not None else "ok"
