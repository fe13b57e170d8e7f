"""The engine facade the HTTP layer talks to: request normalisation, outputs in SGLang's shape, control ops.

Runs on the asyncio side. Generation goes to the scheduler thread through `Scheduler.submit`;
every control operation runs on the scheduler thread between two steps through `Scheduler.call`, so
it never races a forward pass. The weight version and the weight-update ops are `Engine.weights`
(weight_updates.py).
"""

from __future__ import annotations

import asyncio
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
from rollout_server.engine.model_runner import ModelRunner, resolve_device
from rollout_server.engine.protocol import GenerateReqInput
from rollout_server.engine.sampling import SamplingParams, make_generator
from rollout_server.engine.scheduler import PauseMode, Req, Scheduler, Snapshot
from rollout_server.engine.weight_updates import WeightUpdates

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away; its unfinished requests are aborted."""


@dataclass(frozen=True)
class Item:
    """One normalised generation request (a batch entry, or one of its n samples)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    return_logprob: bool
    logprob_start_len: int
    return_text_in_logprobs: bool
    seed: int | None
    created_s: float


def check_text(text: str, name: str) -> str:
    """Refuse text that UTF-8 cannot encode (a lone surrogate from a JSON \\ud800 escape): the tokenizer
    would fail on it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode: {e.reason} at position {e.start}") from None
    return text


def _per_item(value: Any, batch: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * batch
    if isinstance(value, list):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {batch}")
        return [default if v is None else v for v in value]
    return [value] * batch


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
        )
        self.weights = WeightUpdates(config, self.scheduler, self.runner)
        self.receiver = self.weights.receiver
        self.served_model_name = config.served_model_name or config.model_path

    @property
    def weight_version(self) -> str:
        """SGLang's weight version string, as every answer reports it (`weights.weight_version`)."""
        return self.weights.weight_version

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

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self.scheduler.call(fn)), self.config.control_timeout_s)

    # ---------------- generation ----------------
    def prepare(self, obj: GenerateReqInput) -> tuple[list[Item], bool]:
        """Validate and expand a /generate body into items; raise ValueError with SGLang-like messages."""
        for name in ("input_embeds", "image_data", "video_data", "audio_data", "lora_path", "token_ids_logprob"):
            if getattr(obj, name) is not None:
                raise ValueError(f"{name} is not supported by the built-in engine")
        if obj.top_logprobs_num not in (None, 0) and not (
            isinstance(obj.top_logprobs_num, list) and not any(obj.top_logprobs_num)
        ):
            raise ValueError("top_logprobs_num is not supported by the built-in engine")
        if obj.return_hidden_states not in (False, None) and obj.return_hidden_states != []:
            raise ValueError("return_hidden_states is not supported by the built-in engine")
        if (obj.text is None) == (obj.input_ids is None):
            raise ValueError("Either text or input_ids should be provided.")
        prompts: list[list[int]]
        if obj.text is not None:
            single = isinstance(obj.text, str)
            texts = [obj.text] if isinstance(obj.text, str) else obj.text
            prompts = [list(self.tokenizer.encode(check_text(t, "text"))) for t in texts]
        else:
            assert obj.input_ids is not None
            single = not obj.input_ids or not isinstance(obj.input_ids[0], list)
            prompts = [list(obj.input_ids)] if single else [list(p) for p in obj.input_ids]  # type: ignore[arg-type]
        batch = len(prompts)
        if batch == 0:
            raise ValueError("The batch is empty.")
        raw_params = _per_item(obj.sampling_params, batch, "sampling_params", {})
        logprob = _per_item(obj.return_logprob, batch, "return_logprob", False)
        start_len = _per_item(obj.logprob_start_len, batch, "logprob_start_len", -1)
        if isinstance(obj.rid, list):
            rids = _per_item(obj.rid, batch, "rid", None)
        else:
            rids = [obj.rid if single else (f"{obj.rid}_{i}" if obj.rid else None) for i in range(batch)]
        all_params = [SamplingParams.from_dict(raw_params[i], self.vocab_size) for i in range(batch)]
        num_items = sum(p.n for p in all_params)
        if num_items > self.config.max_request_items:
            raise ValueError(
                f"the request asks for {num_items} sequences (prompts x n); the limit is "
                f"{self.config.max_request_items} (--max_request_items)"
            )
        now = time.monotonic()
        items: list[Item] = []
        for i, ids in enumerate(prompts):
            params = all_params[i]
            self._check_prompt(ids)
            if params.max_new_tokens == -1:
                max_new = self.context_length - len(ids) - 1
            else:
                max_new = params.max_new_tokens
                if max_new + len(ids) >= self.context_length:
                    raise ValueError(
                        f"Requested token count exceeds the model's maximum context length of {self.context_length} "
                        f"tokens. You requested a total of {max_new + len(ids)} tokens: {len(ids)} tokens from the "
                        f"input messages and {max_new} tokens for the completion. Please reduce the number of tokens "
                        "in the input messages or the completion to fit within the limit."
                    )
            if not -1 <= start_len[i] < max(len(ids), 1):
                raise ValueError(f"logprob_start_len must be in [-1, {len(ids) - 1}], got {start_len[i]}")
            base_rid = rids[i] or uuid.uuid4().hex
            for j in range(params.n):
                seed = None if params.sampling_seed is None else params.sampling_seed + j
                rid = base_rid if params.n == 1 else f"{base_rid}_{j}"
                items.append(
                    Item(
                        rid=rid,
                        input_ids=ids,
                        params=params,
                        max_new_tokens=max_new,
                        return_logprob=bool(logprob[i]),
                        logprob_start_len=int(start_len[i]),
                        return_text_in_logprobs=obj.return_text_in_logprobs,
                        seed=seed,
                        created_s=now,
                    )
                )
            if params.n > 1:
                single = False
        if len({it.rid for it in items}) != len(items):
            raise ValueError(f"Duplicate request IDs detected within the request: {[it.rid for it in items]}")
        return items, single

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("The input is empty (0 tokens).")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input_ids contain token ids outside [0, {self.vocab_size - 1}]: {bad[:5]}")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"The input ({len(ids)} tokens) is longer than the model's context length ({self.context_length} tokens)."
            )

    async def run(
        self,
        items: Sequence[Item],
        stream: bool,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
        """Submit `items`; yield (index, output) per final output (and per step when streaming)."""
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
            )
            for i, it in enumerate(items)
        ]
        pending = set(range(len(reqs)))
        self.scheduler.submit(reqs)
        try:
            while pending:
                try:
                    i, snap = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        raise ClientDisconnected from None
                    continue
                if snap.finish is not None:
                    pending.discard(i)
                yield i, self.build_output(items[i], snap)
        finally:
            if pending:
                rids = [items[i].rid for i in pending]
                self.scheduler.call(lambda: sum(self.scheduler.abort(r, "client disconnected") for r in rids))

    async def generate(
        self, obj: GenerateReqInput, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        items, single = self.prepare(obj)
        outputs: list[dict[str, Any]] = [{} for _ in items]
        async for i, out in self.run(items, stream=False, is_disconnected=is_disconnected):
            outputs[i] = out
        return outputs[0] if single else outputs

    def build_output(self, item: Item, snap: Snapshot) -> dict[str, Any]:
        """SGLang's /generate output: text (stop trimmed unless no_stop_trim), output_ids, meta_info."""
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
            "weight_version": self.weight_version,
            "num_retractions": snap.num_retractions,
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "e2e_latency": time.monotonic() - item.created_s,
        }
        if item.return_logprob:
            meta["output_token_logprobs"] = self._logprob_triples(
                snap.output_logprobs, ids, item.return_text_in_logprobs
            )
            if snap.input_logprobs is not None:
                prompt = item.input_ids[item.logprob_start_len :]
                meta["input_token_logprobs"] = self._logprob_triples(
                    snap.input_logprobs, prompt, item.return_text_in_logprobs
                )
        return {"text": text, "output_ids": list(ids), "meta_info": meta}

    def _logprob_triples(self, values: Sequence[float | None], ids: Sequence[int], with_text: bool) -> list[list[Any]]:
        texts = [self._decode([t], False) if with_text else None for t in ids]
        return [[v, t, s] for v, t, s in zip(values, ids, texts, strict=True)]

    async def health_probe(self) -> bool:
        """A one-token greedy generation on input_ids [0], skipped (healthy) while the engine is busy or paused."""
        if not self.scheduler.alive:
            return False
        load = await self._call(self.scheduler.load)
        if self.scheduler.paused or load["num_running_reqs"] or load["num_waiting_reqs"]:
            return True
        item = Item(
            f"HEALTH_CHECK_{time.time()}",
            [0],
            SamplingParams(max_new_tokens=1, temperature=0.0),
            1,
            False,
            -1,
            False,
            None,
            time.monotonic(),
        )

        async def probe() -> None:
            async for _ in self.run([item], stream=False):
                pass

        try:
            await asyncio.wait_for(probe(), self.config.health_timeout_s)
        except TimeoutError:
            log.error("health probe got no token within %.0fs", self.config.health_timeout_s)
            return False
        return True

    # ---------------- control ----------------
    async def pause(self, mode: PauseMode) -> None:
        await self._call(lambda: self.scheduler.pause(mode))

    async def resume(self) -> None:
        await self._call(self.scheduler.resume)

    async def abort(self, rid: str, abort_all: bool) -> int:
        if not abort_all and not rid:
            return 0
        return await self._call(lambda: self.scheduler.abort(None if abort_all else rid, "Abort by abort_request."))

    async def flush_cache(self) -> tuple[bool, str]:
        return await self._call(self.scheduler.flush_cache)

    async def load(self) -> dict[str, int]:
        return await self._call(self.scheduler.load)


def _deliver(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[int, Snapshot]], index: int, snap: Snapshot
) -> None:
    """A request's sink: runs on the scheduler thread, hands the snapshot to the request's event loop."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, (index, snap))
    except RuntimeError:  # the event loop is closed: the server shut down and nobody waits for this request
        log.debug("dropped output of a request whose event loop is closed")
