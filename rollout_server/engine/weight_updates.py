"""The engine's weight-update control ops, as SGLang names them: the weight version string, joining and leaving a
weight-update group, receiving broadcast buckets, and loading an HF directory from disk.

Every op that touches the model runs on the scheduler thread between two steps (control.py), so it never races a
forward pass, and a deadline that passes before it started withdraws it: a control call completes or changes
nothing. Broadcast tensors are received on a worker thread (the broadcast may block); a disk load reads and checks
the new weights on a worker thread (staging, bounded by `weight_update_timeout_s`; past it they are dropped) and
swaps them in with one scheduler command that also sets the version, so the version always names the weights served.
The weight version is SGLang's free string (`/update_weight_version`, the updates' `weight_version` field): the
engine stores and reports it as given (`Scheduler.weight_version`); what it means as a policy version is
weights/version.py's concern (its readers').
Distributed updates run inside a weight-update session (`/begin_weight_update` ... `/end_weight_update`), as
SGLang 0.5.23 requires: outside one they are refused with SGLang's message; a second begin is refused too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from rollout_server.engine.config import EngineConfig
from rollout_server.engine.control import ControlTimeout, control_call
from rollout_server.engine.model_runner import ModelRunner
from rollout_server.engine.protocol import (
    InitWeightsUpdateGroupReqInput,
    UpdateWeightFromDiskReqInput,
    UpdateWeightsFromDistributedReqInput,
)
from rollout_server.engine.scheduler import Scheduler
from rollout_server.engine.weight_receiver import WeightReceiver
from weights.group import parse_dtype

log = logging.getLogger(__name__)
T = TypeVar("T")


class WeightUpdates:
    """The weight version string and the update ops of one engine (SGLang's control endpoints behind them)."""

    def __init__(self, config: EngineConfig, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.receiver = WeightReceiver()
        self._lock = asyncio.Lock()
        self._session_open = False

    @property
    def weight_version(self) -> str:
        """As SGLang reports it: `--weight_version` at start ("default" unless given), then the last one set."""
        return self.scheduler.weight_version

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        return await control_call(self.scheduler, fn, self.config.control_timeout_s, what)

    def _swap(
        self, named: Sequence[tuple[str, torch.Tensor]] | None, weight_version: str | None, flush: bool, abort: str
    ) -> tuple[int, str]:
        """One scheduler command (between two steps): abort all requests when `abort` names the op, load `named`,
        set the version, flush the KV cache if idle. Returns (requests running before, a note for the answer)."""
        num_running = len(self.scheduler.running)
        if abort:
            self.scheduler.abort(None, f"Abort by {abort}.")
        if named is not None:
            self.runner.load_weights(named)  # checks every tensor before writing any
        note = ""
        if weight_version is not None:
            self.scheduler.weight_version = weight_version
            note = f" Weight version updated to {weight_version}."
        if flush:
            ok, message = self.scheduler.flush_cache()
            if not ok:
                log.info("flush after weight update skipped: %s", message.strip())
        return num_running, note

    async def update_weight_version(self, new_version: str, abort_all_requests: bool) -> None:
        abort = "update_weight_version" if abort_all_requests else ""
        await self._call(lambda: self._swap(None, new_version, False, abort), "update_weight_version")

    async def init_group(self, obj: InitWeightsUpdateGroupReqInput) -> tuple[bool, str]:
        if obj.world_size < 2 or not 1 <= obj.rank_offset < obj.world_size:
            return (
                False,
                f"need world_size >= 2 and 1 <= rank_offset < world_size, got {obj.rank_offset}/{obj.world_size}",
            )
        async with self._lock:
            try:
                await asyncio.to_thread(
                    self.receiver.join,
                    obj.master_address,
                    obj.master_port,
                    obj.rank_offset,
                    obj.world_size,
                    obj.group_name,
                    obj.backend,
                    self.config.weight_update_timeout_s,
                )
            # A peer that never shows up or a refused rendezvous is an expected failure: report it.
            except (ValueError, TimeoutError, RuntimeError) as e:
                return False, f"Failed to init weights update group {obj.group_name!r}: {e}"
        return True, "Succeeded to initialize custom process group."

    async def destroy_group(self, group_name: str) -> tuple[bool, str]:
        async with self._lock:
            try:
                self.receiver.destroy(group_name)
            except ValueError as e:
                return False, str(e)
        return True, "Succeeded to destroy custom process group."

    def begin_session(self) -> tuple[bool, str]:
        """SGLang's begin_weight_update: distributed updates are accepted until end_session."""
        if self._session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self._session_open = True
        return True, "Success"

    def end_session(self) -> tuple[bool, str]:
        if not self._session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self._session_open = False
        return True, "Success"

    async def from_distributed(self, obj: UpdateWeightsFromDistributedReqInput) -> tuple[bool, str]:
        if not len(obj.names) == len(obj.dtypes) == len(obj.shapes):
            return (
                False,
                f"names, dtypes and shapes differ in length ({len(obj.names)}, {len(obj.dtypes)}, {len(obj.shapes)})",
            )
        try:
            dtypes = [parse_dtype(d) for d in obj.dtypes]
            if any(s < 0 for shape in obj.shapes for s in shape):
                raise ValueError(f"negative dimension in shapes {obj.shapes}")
            self.receiver.group(obj.group_name)
        except ValueError as e:
            return False, str(e)
        if not self._session_open:  # checked after the body: a malformed one is told what is wrong with it
            return (
                False,
                "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()",
            )
        async with self._lock:
            if obj.abort_all_requests:
                await self._call(
                    lambda: self.scheduler.abort(None, "Abort by update_weights_from_distributed."),
                    "update_weights_from_distributed",
                )
            targets = self._in_place_targets(obj.group_name, obj.names, dtypes, obj.shapes)
            try:
                tensors = await asyncio.to_thread(
                    self.receiver.receive,
                    obj.group_name,
                    dtypes,
                    obj.shapes,
                    self.runner.device,
                    self.config.weight_update_timeout_s,
                    targets,
                )
            except (TimeoutError, RuntimeError) as e:  # a dead or mismatched peer
                return False, f"Failed to receive weights on {obj.group_name!r}: {e}"
            # Received into new tensors: checked, then copied between two scheduler steps with the version. Received
            # in place (paused): already in the parameters, as SGLang's partial loads are; the version follows.
            named = list(zip(obj.names, tensors, strict=True)) if targets is None else None
            try:
                _, note = await self._call(
                    lambda: self._swap(named, obj.weight_version, obj.flush_cache, ""),
                    "update_weights_from_distributed",
                )
            except ValueError as e:
                return False, f"Failed to update weights: {e}"
            except ControlTimeout as e:
                if named is None:  # not "unchanged": the bucket is in the parameters already
                    raise ControlTimeout(
                        f"update_weights_from_distributed: the bucket was received into the paused engine's "
                        f"parameters, but setting its version did not start within {self.config.control_timeout_s:g}s "
                        "(--control_timeout_s)"
                    ) from e
                raise
        return True, "Succeeded to update parameter online." + note

    def _in_place_targets(
        self, group_name: str, names: Sequence[str], dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor] | None:
        """The parameters themselves (or, for per-expert names, their slices of the fused expert parameters) as
        receive buffers, when generation is paused (no forward reads them) and every name is a contiguous
        parameter of that dtype and shape on the group's device; else None."""
        if not self.scheduler.paused:
            return None
        gloo = self.receiver.backends[group_name] == "gloo"
        params = self.runner.weight_targets()
        targets = []
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            p = params.get(name)
            if (
                p is None
                or p.dtype != dtype
                or tuple(p.shape) != tuple(shape)
                or not p.is_contiguous()
                or (p.device.type != "cpu" if gloo else p.device != self.runner.device)
            ):
                return None
            targets.append(p)
        return targets

    async def from_disk(self, obj: UpdateWeightFromDiskReqInput) -> tuple[bool, str, int]:
        """(success, message, requests running when the update began: SGLang's num_paused_requests).

        The new weights are read and checked off the scheduler thread (generation goes on meanwhile) within
        `weight_update_timeout_s`, then swapped in by one scheduler command with the version and the flush. A
        failure at any point before the swap leaves the weights and the version as they were."""
        timeout_s = self.config.weight_update_timeout_s
        async with self._lock:
            cancelled = threading.Event()
            staging = asyncio.ensure_future(asyncio.to_thread(self.runner.stage_from_disk, obj.model_path, cancelled))
            staging.add_done_callback(_consume)
            try:
                named = await asyncio.wait_for(asyncio.shield(staging), timeout_s)
            except TimeoutError:
                cancelled.set()  # the staging thread drops what it read at its next tensor
                return (
                    False,
                    f"Failed to update weights: reading {obj.model_path!r} took longer than {timeout_s:g}s "
                    f"(--weight_update_timeout_s); the engine keeps its weights and version {self.weight_version!r}",
                    0,
                )
            except (ValueError, OSError) as e:  # OSError: e.g. an export pruned while it was read
                return False, f"Failed to update weights: {e}", 0
            assert named is not None
            abort = "update_weights_from_disk" if obj.abort_all_requests else ""

            def swap() -> tuple[int, str]:
                num_running, note = self._swap(named, obj.weight_version, obj.flush_cache, abort)
                self.runner.model_path = obj.model_path
                return num_running, note

            num_running, note = await self._call(swap, "update_weights_from_disk")  # ControlTimeout: unchanged
        return True, f"Succeeded to update model weights ({len(named)} tensors).{note}", num_running


def _consume(fut: asyncio.Future[Any]) -> None:
    """A staging abandoned at its deadline may still fail: its error was already answered, do not log it again."""
    if not fut.cancelled():
        fut.exception()
