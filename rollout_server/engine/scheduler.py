"""Continuous batching on a dedicated thread that owns the model.

Requests wait in a FIFO queue; whenever KV slots are free, waiting requests are prefilled together
(up to `max_prefill_tokens` padded tokens); otherwise all running requests decode one token each in
one batched forward, each with its own sampling parameters and RNG. Finished sequences leave and free
their slot between steps. The asyncio HTTP side talks to this thread only through `submit` (new
requests), `call` (a function run on this thread between steps, answered through a Future) and each
request's `sink` (called here with an immutable snapshot; the sink hands it to the event loop).

The weight version lives here, beside the weights it names: it is changed only on this thread, by the same
command that changes the weights (weight_updates.py), and every snapshot carries the version of the weights its
last token came from. A change records, in each live request with tokens, where the old version's tokens end, so a
request that spans an update (paused retract/in_place) reports each span's version (`weight_version_spans`, as
SGLang 0.5.23's `meta_info.weight_versions`). `submit` bounds the waiting queue (`max_queued`): beyond it a request
is refused, not queued.

Prefix sharing (prefix_sharing.py, on unless `enable_prefix_sharing` is off): a request admitted while another one
holds K/V of its first tokens copies them into its own slot at admission, on this thread, and prefills only the
rest; a group's n samples of one prompt compute it once (`Req.cached_tokens`, `num_prefill_tokens`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from http import HTTPStatus
from typing import Any, Literal, TypeVar

import torch

from rollout_server.engine.model_runner import ModelRunner
from rollout_server.engine.prefix_sharing import DEFER, num_tokens, pick_source, wants_prompt_logprobs
from rollout_server.engine.request_state import FinishReason, Req
from rollout_server.engine.sampling import prompt_logprobs, sample_with_top

log = logging.getLogger(__name__)
T = TypeVar("T")
PauseMode = Literal["abort", "retract", "in_place"]


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        decode_tail: Callable[[Sequence[int], bool], str],
        eos_token_ids: set[int],
        max_prefill_tokens: int = 8192,
        original_logprob: bool = False,
        weight_version: str = "default",
        enable_prefix_sharing: bool = True,
    ) -> None:
        self.runner = runner
        self._decode_tail = decode_tail
        self.eos_token_ids = eos_token_ids
        self.max_prefill_tokens = max_prefill_tokens
        self.original_logprob = original_logprob
        self.enable_prefix_sharing = enable_prefix_sharing
        # Owned by the scheduler thread.
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.paused = False
        self._weight_version = weight_version
        self.num_steps = 0
        self.num_generated = 0
        self.max_decode_batch = 0  # largest batch decoded in one forward (observability, tests)
        self.num_prefill_tokens = 0  # tokens computed by prefill forwards (not copied, not padding)
        self._epoch_bumps = 0
        # Cross-thread hand-over.
        self._lock = threading.Lock()
        self._inbox: list[Req] = []
        self._commands: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def kv_epoch(self) -> int:
        """Changes whenever K/V computed before may differ from K/V computed now (weights loaded, a version change,
        a pause, whose distributed updates write straight into the parameters; a flush): no sharing across it."""
        return self._epoch_bumps + self.runner.weight_loads

    @property
    def weight_version(self) -> str:
        """SGLang's weight version string of the weights every step runs with (set through `call` only)."""
        return self._weight_version

    @weight_version.setter
    def weight_version(self, new: str) -> None:
        # A setter, not a method: weight_updates.py names the weights by assigning it. As SGLang's
        # record_weight_version_change: the running and waiting (retracted) requests' tokens so far are the old
        # version's; an unchanged version records nothing.
        if new == self._weight_version:
            return
        for r in (*self.running, *self.waiting):
            if r.output_ids:
                r.version_changes.append((self._weight_version, len(r.output_ids)))
        self._weight_version = new
        self._epoch_bumps += 1

    # ---- thread-safe API ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def submit(self, reqs: Sequence[Req], max_queued: int | None = None) -> bool:
        """Queue `reqs`, all or none: False (nothing queued) when the waiting requests would exceed `max_queued`."""
        with self._lock:
            if max_queued is not None and len(self._inbox) + len(self.waiting) + len(reqs) > max_queued:
                return False
            self._inbox.extend(reqs)
        self._wake.set()
        return True

    @property
    def num_queued(self) -> int:
        """Requests submitted and not running yet (what `max_queued` bounds)."""
        with self._lock:
            return len(self._inbox) + len(self.waiting)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the scheduler thread between two steps (it then has the model to itself)."""
        fut: Future[T] = Future()
        if not self.alive:
            fut.set_exception(RuntimeError(f"engine scheduler is not running: {self.error!r}"))
            return fut
        with self._lock:
            self._commands.append((fn, fut))
        self._wake.set()
        return fut

    # ---- scheduler-thread operations (run them through `call`) ----
    def abort(self, rid: str | None, message: str, status_code: int | None = None, err_type: str | None = None) -> int:
        """Finish matching requests (all when rid is None) with finish_reason abort; return how many.

        SGLang's shapes: a running request ends with FINISH_ABORT's {type, message, status_code, err_type} (null
        codes unless the abort is an error of its own); a waiting one with {type, message} only, unless codes are
        given."""
        self._drain_inbox()

        def match(r: Req) -> bool:
            return rid is None or r.rid == rid or r.rid.startswith(rid + "_")

        waiting = [r for r in self.waiting if match(r)]
        running = [r for r in self.running if match(r)]
        codes = {"status_code": status_code, "err_type": err_type}
        for r in waiting:
            self._finish(r, {"type": "abort", "message": message, **(codes if status_code is not None else {})})
        for r in running:
            self._finish(r, {"type": "abort", "message": message, **codes})
        hit = waiting + running
        self.waiting = deque(r for r in self.waiting if r.finish is None)
        self.running = [r for r in self.running if r.finish is None]
        return len(hit)

    def pause(self, mode: PauseMode) -> None:
        if mode == "abort":
            self.abort(None, "Abort by pause_generation.")
        elif mode == "retract":
            for r in reversed(self.running):
                self._release(r)
                r.kv_len = 0
                r.num_retractions += 1
                self.waiting.appendleft(r)
            self.running = []
        self.paused = True
        self._epoch_bumps += 1

    def resume(self) -> None:
        self.paused = False

    def flush_cache(self) -> tuple[bool, str]:
        self._drain_inbox()
        if self.running or (self.waiting and not self.paused):
            return False, (
                "Cache not flushed because there are pending requests. "
                f"#queue-req: {len(self.waiting)}, #running-req: {len(self.running)}\n"
            )
        self.runner.cache.reset()
        self._epoch_bumps += 1
        return True, "Cache flushed.\n"

    def load(self) -> dict[str, int]:
        self._drain_inbox()
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "num_used_tokens": sum(r.kv_len for r in self.running),
            "num_total_tokens": self.runner.cache.num_slots * self.runner.cache.max_len,
        }

    # ---- the loop ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._run_commands()
                self._drain_inbox()
                if self.paused or not (self.waiting or self.running):
                    self._wake.wait(timeout=1.0)
                elif self.waiting and self.runner.cache.num_free > 0:
                    self._prefill()
                else:
                    self._decode()
        except BaseException as e:
            log.exception("engine scheduler died")
            self.error = e
            self._stop.set()
            self.abort(None, f"engine error: {e!r}", int(HTTPStatus.INTERNAL_SERVER_ERROR), "InternalServerError")
            self._fail_commands(e)

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, fut in commands:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except Exception as e:  # the caller gets it through the Future
                fut.set_exception(e)

    def _fail_commands(self, error: BaseException) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for _, fut in commands:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError(f"engine scheduler died: {error!r}"))

    def _drain_inbox(self) -> None:
        with self._lock:  # under the lock: `submit` counts inbox + waiting, a request is never in neither
            self.waiting.extend(self._inbox)
            self._inbox = []

    def _prefill(self) -> None:
        batch = self._admit()
        batch.sort(key=lambda r: r.slot if r.slot is not None else -1)
        tokens = [(r.input_ids + r.output_ids)[r.kv_len :] for r in batch]
        want_prompt = [b for b, r in enumerate(batch) if wants_prompt_logprobs(r)]
        logits, full = self.runner.forward(
            [r.slot for r in batch if r.slot is not None], tokens, [r.kv_len for r in batch], want_prompt
        )
        routed = self.runner.last_routed_experts
        for b, r in enumerate(batch):
            r.kv_len += len(tokens[b])
            if r.return_routed_experts and routed is not None:  # after the copied rows: those of every new token
                r.routed.append(routed[b, : len(tokens[b])])
        for b in want_prompt:
            self._set_input_logprobs(batch[b], full[b])
        self.num_steps += 1
        self.num_prefill_tokens += sum(len(t) for t in tokens)
        live = []
        for b, r in enumerate(batch):
            if len(r.output_ids) >= r.max_new_tokens:  # max_new_tokens == 0: prompt logprobs only
                self._finish(r, {"type": "length", "length": r.max_new_tokens})
            else:
                live.append(b)
        self.running.extend(batch[b] for b in live)
        self._append_tokens([batch[b] for b in live], logits[live] if live else logits[:0])

    def _admit(self) -> list[Req]:
        """Take waiting requests in order while slots are free and the padded batch fits `max_prefill_tokens`;
        give each a slot, with the K/V of its prefix shared with a running request copied in (`kv_len` = copied
        tokens). Stops at a request that shares its prompt with one taken here (it copies next step)."""
        batch: list[Req] = []
        width = 0
        epoch, free = self.kv_epoch, self.runner.cache.num_free
        while self.waiting and len(batch) < free:
            r = self.waiting[0]
            pick = pick_source(r, self.running, batch, epoch) if self.enable_prefix_sharing else (None, 0)
            if pick == DEFER:
                break
            assert not isinstance(pick, str)
            src, shared = pick
            new = num_tokens(r) - shared
            if batch and max(width, new) * (len(batch) + 1) > self.max_prefill_tokens:
                break
            width = max(width, new)
            self.waiting.popleft()
            r.slot = self.runner.cache.alloc()
            r.kv_epoch, r.kv_len, r.routed = epoch, 0, []  # a (re-)prefill runs every token again ...
            if src is not None and src.slot is not None and shared > 0:  # ... but those it copies
                self.runner.cache.copy_prefix(src.slot, r.slot, shared)
                r.kv_len = shared
                r.cached_tokens += shared
                if r.return_routed_experts:
                    r.routed = [torch.cat(src.routed)[:shared]]
            batch.append(r)
        return batch

    def _decode(self) -> None:
        # Slot order lets the runner read a dense run of slots through a view instead of a gather.
        self.running.sort(key=lambda r: r.slot if r.slot is not None else -1)
        reqs = self.running
        slots = [r.slot for r in reqs if r.slot is not None]
        assert len(slots) == len(reqs)
        logits, _ = self.runner.forward(slots, [[r.output_ids[-1]] for r in reqs], [r.kv_len for r in reqs])
        routed = self.runner.last_routed_experts
        for b, r in enumerate(reqs):
            r.kv_len += 1
            if r.return_routed_experts and routed is not None:
                r.routed.append(routed[b, :1])
        self.num_steps += 1
        self.max_decode_batch = max(self.max_decode_batch, len(reqs))
        self._append_tokens(reqs, logits)

    def _append_tokens(self, reqs: Sequence[Req], logits: torch.Tensor) -> None:
        if not reqs:
            return
        gens, tops = [r.generator for r in reqs], [r.top.num if r.top else 0 for r in reqs]
        tokens, logprobs, rows = sample_with_top(logits, [r.params for r in reqs], gens, self.original_logprob, tops)
        self.num_generated += len(reqs)
        for r, tok, lp, row in zip(reqs, tokens, logprobs, rows, strict=True):
            r.output_ids.append(tok)
            r.output_logprobs.append(lp)
            if r.top is not None:
                r.top.output.append(row)
            finish = self._check_finished(r)
            if finish is not None:
                self._finish(r, finish)
            elif r.stream:
                r.sink(r.snapshot(self.weight_version))
        if any(r.finish is not None for r in reqs):
            self.running = [r for r in self.running if r.finish is None]

    def _check_finished(self, r: Req) -> FinishReason | None:
        """SGLang's order: length first, then stop tokens (unless ignore_eos), then stop strings."""
        p = r.params
        if len(r.output_ids) >= r.max_new_tokens:
            return {"type": "length", "length": r.max_new_tokens}
        last = r.output_ids[-1]
        if not p.ignore_eos and (last in p.stop_token_ids or last in self.eos_token_ids):
            return {"type": "stop", "matched": last}
        if p.stop:
            # Enough tail tokens to contain the longest stop string even if every token is a single UTF-8 byte.
            tail = self._decode_tail(r.output_ids[-(4 * max(len(s) for s in p.stop) + 2) :], p.skip_special_tokens)
            for s in p.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
        return None

    def _set_input_logprobs(self, r: Req, logits: torch.Tensor) -> None:
        args = (r.params, self.original_logprob, r.logprob_start_len, r.top)
        r.input_logprobs = prompt_logprobs(logits, r.input_ids, *args)

    def _release(self, r: Req) -> None:
        if r.slot is not None:
            self.runner.cache.free(r.slot)
            r.slot = None

    def _finish(self, r: Req, reason: FinishReason) -> None:
        r.finish = reason
        self._release(r)
        r.sink(r.snapshot(self.weight_version))
