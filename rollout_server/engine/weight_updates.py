"""The engine's weight-update control ops, as SGLang names them: the weight version string, joining and leaving a
weight-update group, receiving broadcast buckets, and loading an HF directory from disk.

Every op that touches the model runs on the scheduler thread between two steps (`Scheduler.call`), so it never
races a forward pass; broadcast tensors are received on a worker thread (the broadcast may block). The weight
version is SGLang's free string (`/update_weight_version`, the updates' `weight_version` field): the engine stores
and reports it as given; what it means as a policy version is weights/version.py's concern (its readers').
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from rollout_server.engine.config import EngineConfig
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
        self.weight_version = config.weight_version
        """As SGLang reports it: `--weight_version` at start ("default" unless given), then the last one set."""
        self._lock = asyncio.Lock()

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self.scheduler.call(fn)), self.config.control_timeout_s)

    def _set_version(self, ok: bool, message: str, weight_version: str | None) -> str:
        """After a successful update that names a version, the engine reports it (SGLang's update endpoints)."""
        if ok and weight_version is not None:
            self.weight_version = weight_version
            message += f" Weight version updated to {weight_version}."
        return message

    async def update_weight_version(self, new_version: str, abort_all_requests: bool) -> None:
        if abort_all_requests:
            await self._call(lambda: self.scheduler.abort(None, "Abort by update_weight_version."))
        self.weight_version = new_version

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

    async def from_distributed(self, obj: UpdateWeightsFromDistributedReqInput) -> tuple[bool, str]:
        ok, message = await self._receive_bucket(obj)
        return ok, self._set_version(ok, message, obj.weight_version)

    async def _receive_bucket(self, obj: UpdateWeightsFromDistributedReqInput) -> tuple[bool, str]:
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
        async with self._lock:
            if obj.abort_all_requests:
                await self._call(lambda: self.scheduler.abort(None, "Abort by update_weights_from_distributed."))
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
            if targets is None:  # received into new tensors: validate, then copy between two scheduler steps
                named = list(zip(obj.names, tensors, strict=True))
                try:
                    await self._call(lambda: self.runner.load_weights(named))
                except ValueError as e:
                    return False, f"Failed to update weights: {e}"
            if obj.flush_cache:
                await self._flush_if_idle()
        return True, "Succeeded to update parameter online."

    def _in_place_targets(
        self, group_name: str, names: Sequence[str], dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor] | None:
        """The parameters themselves as receive buffers, when generation is paused (no forward reads them) and
        every name is a contiguous parameter of that dtype and shape on the group's device; else None."""
        if not self.scheduler.paused:
            return None
        gloo = self.receiver.backends[group_name] == "gloo"
        params = self.runner.parameter_names()
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
            targets.append(p.data)
        return targets

    async def from_disk(self, obj: UpdateWeightFromDiskReqInput) -> tuple[bool, str, int]:
        """(success, message, requests running when the update began: SGLang's num_paused_requests)."""
        async with self._lock:
            if obj.abort_all_requests:
                await self._call(lambda: self.scheduler.abort(None, "Abort by update_weights_from_disk."))
            load = await self._call(self.scheduler.load)
            try:
                num = await self._call(lambda: self.runner.load_from_disk(obj.model_path))
            except ValueError as e:
                return False, f"Failed to update weights: {e}", 0
            if obj.flush_cache:
                await self._flush_if_idle()
        message = self._set_version(True, f"Succeeded to update model weights ({num} tensors).", obj.weight_version)
        return True, message, load["num_running_reqs"]

    async def _flush_if_idle(self) -> None:
        ok, message = await self._call(self.scheduler.flush_cache)
        if not ok:
            log.info("flush after weight update skipped: %s", message.strip())
