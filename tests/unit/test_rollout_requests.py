"""What the rollout worker sends and how it reads answers: the token budget and sampling precedence, parsing of
/generate replies, and what happens to a task that cannot be generated (in-memory broker; no engine needed)."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from broker.base import DEAD, TASKS
from broker.memory import MemoryBroker
from broker.schemas import DeadLetter, RewardInfo, SamplingParams, Task, decode, pack_ids
from common.config import ConfigError, load_config
from common.net import free_port
from rollout_server.worker.client import EngineError, parse_generate
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.generation import TaskRejected, plan_group
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.processors import QWEN3
from rollout_server.worker.router import BuiltinRouter
from rollout_server.worker.worker import RolloutWorker


def _task(prompt_len: int, sampling: SamplingParams | None = None, num_samples: int = 8) -> Task:
    return Task(
        run_id="r",
        group_id="g",
        dataset_index=0,
        prompt_ids=pack_ids(list(range(prompt_len))),
        label="x",
        reward_info=RewardInfo(question="q"),
        sampling=sampling or SamplingParams(),
        num_samples=num_samples,
        policy_version=0,
    )


def _cfg(*overrides: str) -> RolloutConfig:
    return load_config(
        RolloutConfig, overrides=["--engines.use_registry=false", '--engines.urls=["http://e:1"]', *overrides]
    )


def test_budget_is_capped_by_the_context_and_a_full_prompt_is_rejected() -> None:
    """Guards against max_new_tokens ignoring the context limit (METHOD.md: min(max_response_len,
    max_context_len - prompt_len)) and against sending a prompt that leaves no room."""
    cfg = _cfg("--sampling.max_response_len=100", "--sampling.max_context_len=150")
    assert plan_group(_task(30), cfg, QWEN3).max_new_tokens == 100
    assert plan_group(_task(120), cfg, QWEN3).max_new_tokens == 30
    with pytest.raises(TaskRejected, match="150"):
        plan_group(_task(150), cfg, QWEN3)


def test_task_sampling_overrides_config_and_stop_trim_is_forced() -> None:
    """Guards against the feeder's per-task sampling being ignored, config defaults being lost for fields the
    task leaves at the schema default, and the stop token being trimmed (the processor needs it)."""
    cfg = _cfg("--sampling.temperature=0.6", "--sampling.top_k=20", "--sampling.num_samples=4")
    task = _task(10, SamplingParams(temperature=0.9, max_new_tokens=7, no_stop_trim=False, skip_special_tokens=True))
    plan = plan_group(task, cfg, QWEN3)
    p = plan.sampling_params
    assert (p["temperature"], p["top_k"], p["top_p"]) == (0.9, 20, 1.0)
    assert plan.max_new_tokens == 7 and plan.num_samples == 4
    assert p["no_stop_trim"] is True and p["skip_special_tokens"] is False
    assert p["stop_token_ids"] == [151643, 151645]  # neither task nor config names any: the processor's
    assert plan_group(_task(10, num_samples=3), cfg, QWEN3).num_samples == 3


def _reply(ids: list[int], version: str = "default", finish: object = None, **extra: object) -> bytes:
    meta = {
        "finish_reason": finish or {"type": "length", "length": len(ids)},
        "output_token_logprobs": [[-0.5 * (i + 1), t, None] for i, t in enumerate(ids)],
        "weight_version": version,
    }
    return json.dumps({"text": "abc", "output_ids": ids, "meta_info": meta, **extra}).encode()


def test_generate_reply_parsing_keeps_alignment_and_rejects_malformed_replies() -> None:
    """Guards against taking token ids and logprobs from different places without checking they agree, a null
    logprob passing as a number, SGLang's "default" version not mapping to the initial version, an abort
    losing its partial tokens, and a weight_version that names no policy version passing (or raising a bare
    ValueError, which would end the worker: "²" is a digit to str.isdigit but not to int)."""
    res = parse_generate(_reply([5, 6, 7]), initial_policy_version=3)
    assert (res.output_ids, res.logprobs, res.policy_version, res.finish_reason) == (
        [5, 6, 7],
        [-0.5, -1.0, -1.5],
        3,
        "length",
    )
    aborted = parse_generate(_reply([5], "7", {"type": "abort", "message": "paused"}), 0)
    assert (aborted.finish_reason, aborted.output_ids, aborted.policy_version, aborted.abort_status) == (
        "abort",
        [5],
        7,
        None,
    )
    bad = json.loads(_reply([5, 6]))
    bad["output_ids"] = [5]
    with pytest.raises(EngineError, match="disagree"):
        parse_generate(json.dumps(bad).encode(), 0)
    bad = json.loads(_reply([5]))
    bad["meta_info"]["output_token_logprobs"][0][0] = None
    with pytest.raises(EngineError, match="null logprob"):
        parse_generate(json.dumps(bad).encode(), 0)
    for bad_version in ("v2-final", "²", "-1"):
        with pytest.raises(EngineError, match=f"weight_version {bad_version!r} is not a policy version"):
            parse_generate(_reply([5], bad_version), 0)
    with pytest.raises(EngineError, match="finish_reason"):
        parse_generate(msgspec.json.encode({"text": "", "meta_info": {}}), 0)


def _count(metrics: RolloutMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def _run_worker_once(broker: MemoryBroker, cfg: RolloutConfig, metrics: RolloutMetrics) -> None:
    router = BuiltinRouter(cfg, None)
    stop = asyncio.Event()
    worker = asyncio.create_task(RolloutWorker(cfg, broker, router, metrics, "w").run(stop))
    deadline = asyncio.get_running_loop().time() + 10
    while _count(metrics, "longtrace_rollout_dead_letters_total") < 1:  # every task that is not published ends there
        assert asyncio.get_running_loop().time() < deadline and not worker.done()
        await asyncio.sleep(0.02)
    stop.set()
    await worker
    await router.close()


def test_task_without_room_is_dead_lettered_with_its_reason() -> None:
    """Guards against a task that can never be generated being retried forever or silently dropped: it goes
    to the dead stream with a reason naming the limit."""
    broker = MemoryBroker()
    cfg = _cfg(
        f'--engines.urls=["http://127.0.0.1:{free_port()}"]', "--sampling.max_context_len=16", "--broker.block_s=0.05"
    )
    broker.producer(TASKS, Task).publish([_task(16)])
    metrics = RolloutMetrics()
    asyncio.run(_run_worker_once(broker, cfg, metrics))
    [entry] = broker.consumer(DEAD, DeadLetter, "inspect", "i").read(10, 0.1)
    assert entry.msg.stream == TASKS and "max_context_len 16" in entry.msg.reason
    assert decode(entry.msg.payload, Task).group_id == "g"
    assert broker.producer(TASKS, Task).backlog() == 0


def test_engines_failing_retry_the_task_then_dead_letter_it() -> None:
    """Guards against a group whose engines all failed being acked (lost), published with missing or zero-reward
    samples, or held unacked by the live worker forever (issue 19, defect 2): each sample is retried per `[retry]`,
    the task per `[task_retry]`, then it goes to `dead` with the engines' error."""
    broker = MemoryBroker()
    cfg = _cfg(
        f'--engines.urls=["http://127.0.0.1:{free_port()}"]',  # connection refused: a dead engine
        "--max_attempts=2",
        "--retry_backoff_s=0.01",
        "--task_retry.max_attempts=2",
        "--task_retry.base_s=0.01",
        "--router.failure_threshold=100",
        "--broker.block_s=0.05",
    )
    broker.producer(TASKS, Task).publish([_task(4, num_samples=2)])
    metrics = RolloutMetrics()
    asyncio.run(_run_worker_once(broker, cfg, metrics))
    assert (
        _count(metrics, "longtrace_rollout_failed_groups_total") == 2
        and _count(metrics, "longtrace_rollout_groups_total") == 0
    )
    assert broker.producer(TASKS, Task).backlog() == 0
    [entry] = broker.consumer(DEAD, DeadLetter, "inspect", "i").read(10, 0.1)
    assert "samples failed in 2 attempts (--task_retry.max_attempts)" in entry.msg.reason, entry.msg.reason
    assert (metrics.registry.get_sample_value("longtrace_rollout_retries_total", {"reason": "engine_error"}) or 0) >= 4


def test_an_engine_reporting_a_bad_weight_version_fails_the_sample_not_the_worker() -> None:
    """Guards against an engine whose weight_version is "²" crashing the rollout worker (int() raised a ValueError
    nobody caught): its answers are engine errors, retried elsewhere; the group fails, and its task goes to `dead`
    with the engine's version named once its attempts are spent."""
    from fastapi import FastAPI, Response

    from rollout_server.engine.server import BackgroundServer

    app = FastAPI()

    @app.post("/generate")
    async def generate() -> Response:
        return Response(_reply([5, 6], "²"), media_type="application/json")

    broker = MemoryBroker()
    with BackgroundServer(app) as engine:
        cfg = _cfg(
            f'--engines.urls=["{engine.url}"]',
            "--retry.max_attempts=2",
            "--retry.base_s=0.01",
            "--task_retry.max_attempts=1",
            "--router.failure_threshold=100",
            "--broker.block_s=0.05",
        )
        broker.producer(TASKS, Task).publish([_task(4, num_samples=2)])
        metrics = RolloutMetrics()
        asyncio.run(_run_worker_once(broker, cfg, metrics))
    assert (
        _count(metrics, "longtrace_rollout_failed_groups_total") == 1
        and _count(metrics, "longtrace_rollout_groups_total") == 0
    )
    [entry] = broker.consumer(DEAD, DeadLetter, "inspect", "i").read(10, 0.1)
    assert "'²' is not a policy version" in entry.msg.reason, entry.msg.reason
    assert (metrics.registry.get_sample_value("longtrace_rollout_retries_total", {"reason": "engine_error"}) or 0) >= 2


def test_default_weight_version_key_still_loads_as_initial_policy_version(caplog: pytest.LogCaptureFixture) -> None:
    """Guards against configs written before the rename losing their setting (or failing to load): the old key
    is read, with a warning naming the new one; both at once is an error."""
    with caplog.at_level("WARNING"):
        assert _cfg("--default_weight_version=4").initial_policy_version == 4
    assert "use --initial_policy_version" in caplog.text
    assert _cfg().initial_policy_version == 0
    with pytest.raises(ConfigError, match="keep the latter"):
        _cfg("--default_weight_version=4", "--initial_policy_version=5")
