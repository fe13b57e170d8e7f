"""Generate one group: n samples of a task's prompt through the router, each retried and resumed until it ends.

A sample's life: send prompt (+ tokens so far) with the remaining budget to the group's engine (the router's
`GroupAffinity`: the least-loaded engine when the group's first request leases, then the same one for its siblings,
so the engine prefills the shared prompt once). An engine failure (connection, timeout, 5xx) retries on another
engine from the last tokens received. An answer with finish_reason "abort" without an error code means the engine
paused generation for a weight update: wait until it generates again, then resubmit prompt + tokens so far (to the
group's engine) with max_new_tokens reduced by what was generated (partial rollout). Each answer's policy versions
(its `meta_info.weight_versions` spans, else its `weight_version`, parsed by the client) label the tokens it
brought, giving the sample's weight segments. The logprobs are the engine's, one per response token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from broker.schemas import FinishReason, Group, Sample, SamplingParams, Task, WeightSegment, pack_ids, pack_logprobs
from common.logs import warn_once
from rollout_server.worker.client import EngineError, EngineOverloaded, GenerateResult, RequestRejected
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.processors import MessageProcessor
from rollout_server.worker.router import Engine, GroupAffinity, Router

log = logging.getLogger(__name__)

_SCHEMA_DEFAULTS = SamplingParams()
_DEFAULT_NUM_SAMPLES = next(f.default for f in msgspec.structs.fields(Task) if f.name == "num_samples")


class TaskRejected(ValueError):
    """The task cannot be generated as given (e.g. its prompt leaves no room): dead-letter it with this reason."""


class SampleFailed(RuntimeError):
    """A sample could not be generated within its attempts (engines failing or unreachable): retry the task later."""


class SampleRejected(ValueError):
    """An engine refused a sample's request (4xx): the task is at fault, dead-letter it."""


@dataclass
class _Progress:
    """What one sample has accumulated over its requests."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    segments: list[WeightSegment] = field(default_factory=list)

    def add(self, res: GenerateResult) -> None:
        for seg in res.segments:  # the answer's own segments, shifted past the tokens before it
            if not self.segments or self.segments[-1].policy_version != seg.policy_version:
                self.segments.append(WeightSegment(len(self.ids) + seg.start, seg.policy_version))
        self.ids += res.output_ids
        self.logprobs += res.logprobs
        self.texts.append(res.text)


@dataclass(frozen=True)
class GroupPlan:
    """The resolved request of a task: token budget, SGLang sampling params and group size."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling_params: dict[str, Any]
    num_samples: int


def _task_or(task_value: Any, field_name: str, config_value: Any) -> Any:
    """A task field left at the schema's default defers to the worker's config."""
    return task_value if task_value != getattr(_SCHEMA_DEFAULTS, field_name) else config_value


def plan_group(task: Task, cfg: RolloutConfig, processor: MessageProcessor) -> GroupPlan:
    """Resolve what to send for `task`; raise TaskRejected when it cannot be generated."""
    prompt_ids = task.prompt_ids_np().tolist()
    s, sc = task.sampling, cfg.sampling
    if not prompt_ids:
        raise TaskRejected(f"task {task.group_id}: empty prompt")
    room = sc.max_context_len - len(prompt_ids)
    if room <= 0:
        raise TaskRejected(
            f"task {task.group_id}: prompt of {len(prompt_ids)} tokens leaves no room under "
            f"max_context_len {sc.max_context_len}"
        )
    if task.num_samples < 1:
        raise TaskRejected(f"task {task.group_id}: num_samples {task.num_samples} < 1")
    if s.skip_special_tokens or not s.no_stop_trim:
        warn_once(log, "tasks' skip_special_tokens/no_stop_trim are ignored: the processors need the stop token")
    stop_ids = s.stop_token_ids or (
        sc.stop_token_ids if sc.stop_token_ids is not None else list(processor.default_stop_token_ids)
    )
    params: dict[str, Any] = {
        "temperature": _task_or(s.temperature, "temperature", sc.temperature),
        "top_p": _task_or(s.top_p, "top_p", sc.top_p),
        "top_k": _task_or(s.top_k, "top_k", sc.top_k),
        "min_p": s.min_p,
        "stop_token_ids": stop_ids,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "no_stop_trim": True,
    }
    if sc.ignore_eos:
        params["ignore_eos"] = True
    if s.stop:
        params["stop"] = s.stop
    max_response = _task_or(s.max_new_tokens, "max_new_tokens", sc.max_response_len)
    num_samples = task.num_samples if task.num_samples != _DEFAULT_NUM_SAMPLES else sc.num_samples
    return GroupPlan(prompt_ids, min(max_response, room), params, num_samples)


UNREACHABLE_POLLS = 3
"""Consecutive refused /health connections after which a paused sample stops waiting for its engine."""


class SampleGenerator:
    """Generates samples and groups through a router; shared by all groups of a worker."""

    def __init__(
        self, cfg: RolloutConfig, router: Router, processor: MessageProcessor, metrics: RolloutMetrics
    ) -> None:
        self._cfg = cfg
        self._router = router
        self._processor = processor
        self._metrics = metrics

    async def generate_group(self, task: Task, worker_id: str = "") -> Group:
        """All samples of `task`, concurrently; the group exists only once every sample has ended."""
        group, _ = await self.generate_group_with_routing(task, worker_id)
        return group

    async def generate_group_with_routing(self, task: Task, worker_id: str = "") -> tuple[Group, list[bytes | None]]:
        """`generate_group`, and each sample's routed experts (raw int32, [prompt + response tokens - 1, moe
        layers, topk] flattened) with `--sampling.routing_replay`, else None each. The samples' `routing_key` is
        left for the caller, which stores the routing (broker/routing.py)."""
        t0 = time.monotonic()
        plan = plan_group(task, self._cfg, self._processor)
        affinity = GroupAffinity()  # one engine for the group: its prompt is prefilled once there
        futures = [
            asyncio.create_task(self._generate_sample(plan, f"{task.group_id}-{i}", affinity))
            for i in range(plan.num_samples)
        ]
        try:
            results = await asyncio.gather(*futures)
        except BaseException:  # a failed sample (or shutdown) ends its siblings too; then the error propagates
            for f in futures:
                f.cancel()
            await asyncio.gather(*futures, return_exceptions=True)
            raise
        group = Group(task=task, samples=[s for s, _ in results], worker_id=worker_id, rollout_s=time.monotonic() - t0)
        return group, [r for _, r in results]

    async def generate_sample(self, plan: GroupPlan, rid: str, affinity: GroupAffinity | None = None) -> Sample:
        sample, _ = await self._generate_sample(plan, rid, affinity)
        return sample

    async def _generate_sample(
        self, plan: GroupPlan, rid: str, affinity: GroupAffinity | None = None
    ) -> tuple[Sample, bytes | None]:
        cfg, m = self._cfg, self._metrics
        t0 = time.monotonic()
        progress = _Progress()
        num_failures = num_resumes = num_requests = 0
        exclude: tuple[str, ...] = ()
        engine_id = ""
        stalled_since: float | None = None  # first abort without progress, to bound waiting on a paused engine
        finish: FinishReason
        replay = cfg.sampling.routing_replay
        routed: bytes | None = None  # the last answer's: it covers every token (its prompt held those before it)
        gen_kw = {"return_routed_experts": True} if replay else {}
        while True:
            remaining = plan.max_new_tokens - len(progress.ids)
            if remaining <= 0:
                finish = "length"
                break
            num_requests += 1
            params = {**plan.sampling_params, "max_new_tokens": remaining}
            leased: Engine | None = None
            try:
                async with self._router.lease(exclude, affinity) as engine:
                    leased = engine
                    res = await engine.client.generate(
                        plan.prompt_ids + progress.ids, params, f"{rid}-{num_requests}", **gen_kw
                    )
            except EngineOverloaded as e:
                # A full queue is back-pressure, not a failure: wait as asked (bounded by the sample's deadline)
                # and prefer another engine; the breaker and the attempt count are left alone.
                m.retries.labels(reason="overloaded").inc()
                if time.monotonic() - t0 + e.retry_after_s > cfg.retry.deadline_s:
                    raise SampleFailed(f"sample {rid}: engines overloaded past --retry.deadline_s: {e}") from e
                exclude = (leased.engine_id,) if leased is not None else ()
                await asyncio.sleep(e.retry_after_s)
                continue
            except EngineError as e:
                num_failures += 1
                if leased is not None:  # None: no engine was available at all
                    self._router.report_failure(leased, str(e))
                    exclude = (leased.engine_id,)
                m.retries.labels(reason="engine_error").inc()
                wait_s = cfg.retry.policy().backoff_s(num_failures)
                if num_failures >= cfg.retry.max_attempts or time.monotonic() - t0 + wait_s > cfg.retry.deadline_s:
                    raise SampleFailed(f"sample {rid}: {num_failures} engine failures, last: {e}") from e
                log.warning("sample %s: %s; retrying elsewhere (%d/%d)", rid, e, num_failures, cfg.retry.max_attempts)
                await asyncio.sleep(wait_s)
                continue
            except RequestRejected as e:
                raise SampleRejected(f"sample {rid}: {e}") from e
            self._router.report_success(engine)
            m.prompt_tokens.inc(res.prompt_tokens)
            m.cached_tokens.inc(res.cached_tokens)
            exclude = ()
            engine_id = engine.engine_id
            progress.add(res)
            routed = res.routed_experts
            if res.finish_reason != "abort":
                finish = res.finish_reason
                break
            if res.abort_status is not None and 400 <= res.abort_status < 500:
                log.warning("sample %s aborted by %s (%s): %s", rid, engine_id, res.abort_status, res.abort_message)
                finish = "abort"
                break
            # Paused for a weight update (or aborted by an operator): resume once the engine generates again.
            now = time.monotonic()
            stalled_since = None if res.output_ids else (stalled_since or now)
            if stalled_since is not None and now - stalled_since > cfg.resume_timeout_s:
                finish = "abort"
                log.warning("sample %s: aborted without progress for %.0fs; giving up", rid, now - stalled_since)
                break
            num_resumes += 1
            m.retries.labels(reason="resume").inc()
            if not await self._wait_generating(engine):
                self._router.report_failure(engine, f"still paused after {cfg.resume_timeout_s}s")
                exclude = (engine.engine_id,)
            elif not res.output_ids:
                await asyncio.sleep(cfg.resume_poll_s)  # an engine that aborts at once while paused: do not spin
        text = "".join(progress.texts)
        parsed = self._processor.parse(text, finish)
        if parsed.ill_formed:
            log.debug("sample %s ill-formed: %s", rid, "; ".join(parsed.ill_formed_reasons))
        if replay:
            _check_routing(routed, len(plan.prompt_ids) + len(progress.ids) - 1, rid, engine_id)
        m.samples.inc()
        m.tokens.inc(len(progress.ids))
        sample = Sample(
            response_ids=pack_ids(progress.ids),
            logprobs=pack_logprobs(progress.logprobs),
            text=text,
            finish_reason=finish,
            status=parsed.status,
            split=parsed.split,
            ill_formed=parsed.ill_formed,
            task_unfinished=parsed.task_unfinished,
            weight_segments=progress.segments,
            engine_id=engine_id,
            num_resumes=num_resumes,
            gen_s=time.monotonic() - t0,
        )
        return sample, routed

    async def _wait_generating(self, engine: Engine) -> bool:
        """Poll the engine's liveness (`EngineClient.health`) until it answers. SGLang and the built-in engine both
        hold a request sent while paused until generation continues, so a live engine is enough to resubmit to, and
        the probe must not be one that a paused engine fails: SGLang's /health generates a token unless
        SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, so polling it kept every paused sample waiting through the push
        and had it give up on (and report to the breaker) a live engine whose push outlasted resume_timeout_s.

        False (resubmit elsewhere) after resume_timeout_s, and at once when the engine is gone: the router took it
        out of rotation (registry heartbeat expired, circuit open) or its port refuses connections
        UNREACHABLE_POLLS times in a row. A paused engine still accepts connections; a killed one does not, and
        waiting out the timeout for it stalled a whole group (and the learner behind it) in the chaos bench."""
        deadline = time.monotonic() + self._cfg.resume_timeout_s
        unreachable = 0
        while time.monotonic() < deadline:
            if engine.removed or engine.open_until is not None:
                return False
            status = await engine.client.health()
            if status == "ok":
                return True
            unreachable = unreachable + 1 if status == "unreachable" else 0
            if unreachable >= UNREACHABLE_POLLS:
                return False
            await asyncio.sleep(self._cfg.resume_poll_s)
        return False


def _check_routing(routed: bytes | None, num_inputs: int, rid: str, engine_id: str) -> None:
    """SampleFailed (the task is retried) when the engine's routing is missing or does not cover the sample's
    tokens: a sample without it would train without replay, or be dead-lettered by the learner."""
    if routed is None:
        raise SampleFailed(f"sample {rid}: engine {engine_id} returned no routed_experts (--sampling.routing_replay)")
    ids = len(routed) // 4
    if len(routed) % 4 or num_inputs < 1 or ids == 0 or ids % num_inputs:
        raise SampleFailed(
            f"sample {rid}: engine {engine_id} returned {len(routed)} bytes of routed_experts, not int32 x "
            f"{num_inputs} tokens x layers x topk"
        )
