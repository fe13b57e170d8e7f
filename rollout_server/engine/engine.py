"""The engine facade the HTTP layer talks to: requests in (items.py), outputs in SGLang's shape, control ops.

Runs on the asyncio side. Generation goes to the scheduler thread through `Scheduler.submit`, refused beyond
`max_queued_requests` waiting sequences (`EngineOverloaded`: HTTP 503 with Retry-After, as SGLang's
`--max-queued-requests`); every control operation runs on the scheduler thread between two steps (control.py), so
it never races a forward pass and either completes or is withdrawn. The weight version and the weight-update ops
are `Engine.weights` (weight_updates.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from rollout_server.engine.config import EngineConfig
from rollout_server.engine.control import ControlTimeout, control_call
from rollout_server.engine.items import Item, check_text, prepare
from rollout_server.engine.model_runner import ModelRunner, resolve_device
from rollout_server.engine.protocol import GenerateReqInput
from rollout_server.engine.request_state import Req, Snapshot
from rollout_server.engine.sampling import SamplingParams, make_generator
from rollout_server.engine.scheduler import PauseMode, Scheduler
from rollout_server.engine.top_logprobs import TopLogprobs, TopRow
from rollout_server.engine.weight_updates import WeightUpdates

__all__ = ["ClientDisconnected", "Engine", "EngineOverloaded", "Item", "Submission", "check_text"]

log = logging.getLogger(__name__)
T = TypeVar("T")
HEALTH_PAUSE_POLL_S = 0.1
"""How often a health probe held by a paused engine looks whether generation has continued."""


class ClientDisconnected(Exception):
    """The HTTP client went away; its unfinished requests are aborted."""


class EngineOverloaded(Exception):
    """The waiting queue is full (`max_queued_requests`): nothing was queued; retry later or elsewhere (HTTP 503)."""


@dataclass
class Submission:
    """Items queued on the scheduler; their outputs arrive on `queue` as (index, snapshot)."""

    items: Sequence[Item]
    reqs: list[Req]
    queue: asyncio.Queue[tuple[int, Snapshot]]


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        if not config.model_path:
            raise ValueError("--model is required (a Hugging Face model directory)")
        if not (Path(config.model_path) / "config.json").is_file():
            raise ValueError(f"--model {config.model_path}: no config.json (expected a Hugging Face model directory)")
        if config.tokenizer_path and not Path(config.tokenizer_path).is_dir():
            raise ValueError(f"--tokenizer_path {config.tokenizer_path}: no such directory")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        device = resolve_device(config.device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(config.tokenizer_path or config.model_path)
        self._token_texts: dict[int, str] = {}  # one token's text in logprob triples (`_token_text`)
        self.runner = ModelRunner(
            config.model_path,
            num_slots=config.max_running_requests,
            context_length=config.context_length,
            dtype=getattr(torch, config.dtype),
            device=device,
        )
        self.context_length = self.runner.context_length
        self.vocab_size = self.runner.vocab_size
        self.eos_token_ids = self._eos_ids(GenerationConfig)
        # The scheduler thread decodes stop-string tails with its own tokenizer: a fast tokenizer encoding on
        # the event loop thread mutably borrows its Rust state, and a concurrent decode would fail.
        stop_tokenizer: Any = AutoTokenizer.from_pretrained(config.tokenizer_path or config.model_path)

        def decode_tail(ids: Sequence[int], skip_special_tokens: bool) -> str:
            text: str = stop_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
            return text

        self.scheduler = Scheduler(
            self.runner,
            decode_tail,
            self.eos_token_ids,
            max_prefill_tokens=config.max_prefill_tokens,
            original_logprob=config.return_original_logprob,
            weight_version=config.weight_version,
            enable_prefix_sharing=config.enable_prefix_sharing,
        )
        self.weights = WeightUpdates(config, self.scheduler, self.runner)
        self.receiver = self.weights.receiver
        self.served_model_name = config.served_model_name or config.model_path

    @property
    def weight_version(self) -> str:
        """SGLang's weight version string of the weights served now (`Scheduler.weight_version`); each output
        carries the version of the weights its last token came from."""
        return self.scheduler.weight_version

    def _eos_ids(self, generation_config_cls: Any) -> set[int]:
        ids: set[int] = set()

        def add(value: Any) -> None:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))

        add(getattr(self.runner.config, "eos_token_id", None))
        add(self.tokenizer.eos_token_id)
        if (Path(self.config.model_path) / "generation_config.json").is_file():
            add(generation_config_cls.from_pretrained(self.config.model_path).eos_token_id)
        return ids

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        self.scheduler.stop()

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        return await control_call(self.scheduler, fn, self.config.control_timeout_s, what)

    # ---------------- generation ----------------
    def prepare(self, obj: GenerateReqInput) -> tuple[list[Item], bool]:
        """Validate and expand a /generate body into items (items.py); raise ValueError with SGLang-like messages."""
        items, single = prepare(obj, self.tokenizer, self.vocab_size, self.context_length, self.config)
        if not self.runner.is_moe and any(it.return_routed_experts for it in items):
            raise ValueError("return_routed_experts needs an MoE model (this one is dense)")
        return items, single

    def submit(self, items: Sequence[Item], stream: bool) -> Submission:
        """Queue `items` on the scheduler, all or none; EngineOverloaded when the waiting queue has no room."""
        if not self.scheduler.alive:
            raise RuntimeError(f"engine scheduler is not running: {self.scheduler.error!r}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Snapshot]] = asyncio.Queue()
        reqs = [
            Req(
                rid=it.rid,
                input_ids=it.input_ids,
                params=it.params,
                max_new_tokens=it.max_new_tokens,
                generator=make_generator(it.seed, self.runner.device),
                sink=functools.partial(_deliver, loop, queue, i),
                stream=stream,
                return_logprob=it.return_logprob,
                logprob_start_len=it.logprob_start_len,
                top=TopLogprobs(it.top_logprobs_num) if it.return_logprob and it.top_logprobs_num > 0 else None,
                return_routed_experts=it.return_routed_experts,
            )
            for i, it in enumerate(items)
        ]
        limit = self.config.max_queued_requests
        if not self.scheduler.submit(reqs, limit):
            raise EngineOverloaded(
                f"The request queue is full. ({self.scheduler.num_queued} sequences waiting, {len(reqs)} more "
                f"asked, --max_queued_requests {limit})"
            )
        return Submission(items, reqs, queue)

    async def results(
        self, sub: Submission, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
        """Yield (index, output) per final output of `sub` (and per step when streaming); closing early (the client
        went away) aborts its unfinished requests."""
        pending = set(range(len(sub.reqs)))
        try:
            while pending:
                try:
                    i, snap = await asyncio.wait_for(sub.queue.get(), timeout=1.0)
                except TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        raise ClientDisconnected from None
                    continue
                if snap.finish is not None:
                    pending.discard(i)
                yield i, self.build_output(sub.items[i], snap)
        finally:
            if pending:
                rids = [sub.items[i].rid for i in pending]
                self.scheduler.call(lambda: sum(self.scheduler.abort(r, "client disconnected") for r in rids))

    async def run(
        self, items: Sequence[Item], stream: bool, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
        """`submit` then `results` (EngineOverloaded at the first iteration)."""
        async with contextlib.aclosing(self.results(self.submit(items, stream), is_disconnected)) as outputs:
            async for out in outputs:
                yield out

    def build_output(self, item: Item, snap: Snapshot) -> dict[str, Any]:
        """SGLang's /generate output: text (stop trimmed unless no_stop_trim), output_ids, meta_info (a final one with
        `weight_versions`, the spans of output tokens per weight version; `output_token_logprobs_length` with
        logprobs)."""
        p = item.params
        ids = snap.output_ids
        finish = snap.finish
        matched = finish.get("matched") if finish else None
        text_ids = ids[:-1] if isinstance(matched, int) and not p.no_stop_trim and ids else ids
        text = self._decode(text_ids, p.skip_special_tokens)
        if isinstance(matched, str) and not p.no_stop_trim:
            pos = text.find(matched)
            if pos != -1:
                text = text[:pos]
        meta: dict[str, Any] = {
            "id": item.rid,
            "finish_reason": finish,
            "prompt_tokens": len(item.input_ids),
            "weight_version": snap.weight_version,
            "num_retractions": snap.num_retractions,
            "completion_tokens": len(ids),
            "cached_tokens": snap.cached_tokens,
            "e2e_latency": time.monotonic() - item.created_s,
        }
        if snap.weight_versions is not None:  # a final output: SGLang names its version by the last span
            meta["weight_versions"] = snap.weight_versions
            meta["weight_version"] = snap.weight_versions[-1]["version"]
        if item.return_logprob:
            meta["output_token_logprobs"] = self._logprob_triples(
                snap.output_logprobs, ids, item.return_text_in_logprobs
            )
            meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
            if snap.input_logprobs is not None:
                prompt = item.input_ids[item.logprob_start_len :]
                meta["input_token_logprobs"] = self._logprob_triples(
                    snap.input_logprobs, prompt, item.return_text_in_logprobs
                )
            if snap.top is not None:  # tokenizer_manager.py `add_logprob_to_meta_info`, its top logprobs part
                meta["output_top_logprobs"] = self._top_triples(snap.top.output, item.return_text_in_logprobs)
                if snap.top.input is not None:  # as input_token_logprobs: with logprob_start_len >= 0 only
                    meta["input_top_logprobs"] = self._top_triples(snap.top.input, item.return_text_in_logprobs)
        if snap.routed_experts is not None:  # SGLang: base64 of the int32 array, the final output only
            meta["routed_experts"] = base64.b64encode(snap.routed_experts.numpy().tobytes()).decode("ascii")
        return {"text": text, "output_ids": list(ids), "meta_info": meta}

    def _logprob_triples(self, values: Sequence[float | None], ids: Sequence[int], with_text: bool) -> list[list[Any]]:
        texts = [self._token_text(t) if with_text else None for t in ids]
        return [[v, t, s] for v, t, s in zip(values, ids, texts, strict=True)]

    def _top_triples(self, rows: Sequence[TopRow | None], with_text: bool) -> list[list[list[Any]] | None]:
        """SGLang's `detokenize_top_logprobs_tokens`: per position its rows' triples, None for a position with none."""
        return [None if row is None else self._logprob_triples(row[0], row[1], with_text) for row in rows]

    def _token_text(self, token_id: int) -> str:
        """One token's text as SGLang's logprob triples carry it (`batch_decode([[id]])`: special tokens kept),
        remembered: a streamed answer with top logprobs asks for the same tokens' texts at every step."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._decode([token_id], False)
        return text

    async def health_probe(self) -> bool:
        """SGLang's generation health check (`/health_generate`; `/health` too unless
        SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION is off): True when the engine shows within `health_timeout_s` that
        it generates. A busy engine passes at once (SGLang's probe passes on any output); an idle one runs a
        one-token greedy generation on input_ids [0]. SGLang's tokenizer manager holds every generation while
        paused, this one too, so a paused engine fails the check once the timeout passes, unless it resumes first
        (SGLang 0.5.23 http_server.py `health_generate`, tokenizer_manager.py `is_pause_cond`)."""
        timeout_s = self.config.health_timeout_s

        async def probe() -> bool:
            while True:
                if not self.scheduler.alive:
                    return False
                if not self.scheduler.paused:
                    paused, load = await self._call(
                        lambda: (self.scheduler.paused, self.scheduler.load()), "health probe"
                    )
                    if not paused:
                        break
                await asyncio.sleep(HEALTH_PAUSE_POLL_S)
            if load["num_running_reqs"] or load["num_waiting_reqs"]:
                return True
            # a unique rid: a clock-based one can repeat between two probes (SGLang's HEALTH_CHECK_<uuid>)
            params = SamplingParams(max_new_tokens=1, temperature=0.0)
            item = Item(f"HEALTH_CHECK_{uuid.uuid4().hex}", [0], params, 1, False, -1, False, None, time.monotonic())
            async for _ in self.run([item], stream=False):
                pass
            return True

        try:
            return await asyncio.wait_for(probe(), timeout_s)
        except EngineOverloaded:  # requests arrived meanwhile: busy, which SGLang's probe counts as healthy
            return True
        except ControlTimeout as e:
            log.error("health probe: %s", e)
        except TimeoutError:
            paused = " (generation is paused)" if self.scheduler.paused else ""
            log.error("health probe got no token within %gs%s", timeout_s, paused)
        except RuntimeError as e:  # the scheduler died meanwhile
            log.error("health probe: %s", e)
        return False

    # ---------------- control ----------------
    async def pause(self, mode: PauseMode) -> None:
        await self._call(lambda: self.scheduler.pause(mode), "pause_generation")

    async def resume(self) -> None:
        await self._call(self.scheduler.resume, "continue_generation")

    async def abort(self, rid: str, abort_all: bool) -> int:
        if not abort_all and not rid:
            return 0
        target = None if abort_all else rid
        return await self._call(lambda: self.scheduler.abort(target, "Abort by abort_request."), "abort_request")

    async def flush_cache(self) -> tuple[bool, str]:
        return await self._call(self.scheduler.flush_cache, "flush_cache")

    async def load(self) -> dict[str, int]:
        return await self._call(self.scheduler.load, "get_load")


def _deliver(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[int, Snapshot]], index: int, snap: Snapshot
) -> None:
    """A request's sink: runs on the scheduler thread, hands the snapshot to the request's event loop."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, (index, snap))
    except RuntimeError:  # the event loop is closed: the server shut down and nobody waits for this request
        log.debug("dropped output of a request whose event loop is closed")
