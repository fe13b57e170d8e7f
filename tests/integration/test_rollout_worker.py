"""Rollout workers against real components: Redis (tests/conftest.py), two built-in engines started by
`python -m rollout_server.launch` (they join the engine registry by heartbeat) on a tiny Qwen3, and workers
in-process or as a subprocess. Tests that break the shared engines run last in this file."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from broker.base import DEAD, ROLLOUTS, TASKS, Broker
from broker.factory import connect
from broker.schemas import DeadLetter, Group, RewardInfo, Task, WeightSegment, decode, pack_ids
from broker.settings import BrokerConfig
from common.config import load_config
from common.net import free_port
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.router import BuiltinRouter, Router, build_router
from rollout_server.worker.worker import RolloutWorker

RUN_ID = "rollout-it"
ENDOFTEXT_ID, IM_END_ID = 0, 2  # ids of the tiny model's tokenizer (rollout_server.models)
LONG = 400  # tokens of a sample that must still be generating when a test pauses or kills something (>= 1 s)


@dataclass
class Engines:
    model_a: Path
    model_b: Path  # same architecture, other seed: "new weights" for the partial-rollout test
    launchers: dict[str, subprocess.Popen[bytes]]  # engine id -> its launcher
    redis_url: str

    def urls(self, wait_for_all: bool = True) -> dict[str, str]:
        """Registered engines; by default wait until every live launcher's engine is back after a flushdb."""
        broker = connect(BrokerConfig.model_validate({"redis_url": self.redis_url, "run_id": RUN_ID}))
        alive = {name for name, p in self.launchers.items() if p.poll() is None}
        deadline = time.monotonic() + 30
        try:
            while True:
                live = {e.engine_id: e.url for e in broker.engines.live()}
                if not wait_for_all or alive <= set(live) or time.monotonic() > deadline:
                    return live
                time.sleep(0.1)
        finally:
            broker.close()


@pytest.fixture(scope="module")
def engines(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    """Two built-in engines, each under `python -m rollout_server.launch`, registered in RUN_ID's registry."""
    from rollout_server.models import init_tiny_model

    tmp = tmp_path_factory.mktemp("rollout")
    model_a = init_tiny_model(tmp / "a", seed=0)
    model_b = init_tiny_model(tmp / "b", seed=1)
    launchers = {}
    for name in ("e0", "e1"):
        cmd = [
            sys.executable, "-m", "rollout_server.launch", "--backend", "builtin", "--model_path", str(model_a),
            "--port", "0", "--engine_id", name, f"--broker.redis_url={redis_server}", f"--broker.run_id={RUN_ID}",
            "--heartbeat_interval_s", "0.3", "--heartbeat_ttl_s", "3", "--extra_args", '["--num_threads", "1"]',
        ]  # fmt: skip
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115  # closed with the process
        launchers[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    env = Engines(model_a, model_b, launchers, redis_server)
    try:
        deadline = time.monotonic() + 180
        while set(env.urls(wait_for_all=False)) != set(launchers):
            dead = {n: p.returncode for n, p in launchers.items() if p.poll() is not None}
            assert not dead and time.monotonic() < deadline, f"engines did not register: {dead} {_tail(tmp)}"
            time.sleep(0.3)
        yield env
    finally:
        for p in launchers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in launchers.values():
            p.wait(timeout=60)


def _tail(tmp: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(tmp.glob("*.log")))


def _config(redis_url: str, *extra: str, builtin_router: bool = True) -> RolloutConfig:
    router = ["--router.health_interval_s=0.5", "--router.cooldown_s=1"] if builtin_router else []
    return load_config(
        RolloutConfig,
        overrides=[
            f"--broker.redis_url={redis_url}",
            f"--broker.run_id={RUN_ID}",
            "--broker.block_s=0.2",
            "--engines.registry_refresh_s=0.3",
            *router,
            "--retry_backoff_s=0.1",
            f"--sampling.stop_token_ids=[{ENDOFTEXT_ID}, {IM_END_ID}]",
            *extra,
        ],
    )


def _prompt(model: Path, question: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]


def _tasks(prompt: list[int], num: int, num_samples: int) -> list[Task]:
    return [
        Task(
            run_id=RUN_ID,
            group_id=f"g{i}",
            dataset_index=i,
            prompt_ids=pack_ids(prompt),
            label="x",
            reward_info=RewardInfo(question="q"),
            num_samples=num_samples,
            policy_version=0,
        )
        for i in range(num)
    ]


Side = Callable[[Router, Broker], Coroutine[Any, Any, None]]


async def _generate(
    cfg: RolloutConfig,
    tasks: list[Task],
    during: Side | None = None,
    worker_id: str = "w",
    expect: set[str] | None = None,
    timeout_s: float = 120,
    wait_engines: bool = True,
    others: dict[str, RolloutMetrics] | None = None,
) -> tuple[list[Group], RolloutMetrics, Router]:
    """Publish `tasks`, run one in-process worker (and `during` alongside) until the groups `expect`ed (default:
    the tasks') are published; return every group published, duplicates included. `others`: more workers run
    alongside, by worker id, each with the metrics object given."""
    broker = connect(cfg.broker)
    router = build_router(cfg, broker)
    await router.start()
    deadline = time.monotonic() + 30
    while wait_engines and len(router.snapshot()) < 2:  # the per-test flushdb wiped the registry: wait for
        assert time.monotonic() < deadline, router.snapshot()  # the next heartbeats
        await asyncio.sleep(0.1)
        assert isinstance(router, BuiltinRouter)
        await router.refresh()
    metrics = RolloutMetrics()
    stop = asyncio.Event()
    running = asyncio.create_task(RolloutWorker(cfg, broker, router, metrics, worker_id).run(stop))
    more = [asyncio.create_task(RolloutWorker(cfg, broker, router, m, w).run(stop)) for w, m in (others or {}).items()]
    if tasks:
        await asyncio.to_thread(broker.producer(TASKS, Task).publish, tasks)
    side = asyncio.create_task(during(router, broker)) if during else None
    reader = broker.consumer(ROLLOUTS, Group, "test-reader", "test-reader")
    groups: list[Group] = []
    deadline = time.monotonic() + timeout_s
    expect = expect if expect is not None else {t.group_id for t in tasks}
    try:
        while not expect <= {g.group_id for g in groups}:
            assert time.monotonic() < deadline, f"only {[g.group_id for g in groups]} after {timeout_s}s"
            for w in (running, *more):
                assert not w.done(), w.exception() if w.done() else ""
            if side is not None and side.done():
                side.result()  # its assertion failed: say so now, not after timeout_s
            groups += [e.msg for e in await asyncio.to_thread(reader.read, 16, 0.2)]
        groups += [e.msg for e in await asyncio.to_thread(reader.read, 16, 1.0)]  # a duplicate would show here
        if side is not None:
            await side
    finally:
        stop.set()
        await asyncio.gather(running, *more)
        await router.close()
        broker.close()
    return groups, metrics, router


def _hf_logprobs(model_dir: Path, prompt: list[int], ids: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[token] of each response token (temperature 1): the engine's convention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # the engines use the other core
    if model_dir not in _MODELS:
        _MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = _MODELS[model_dir]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids.tolist()])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp[torch.arange(len(ids)), torch.tensor(ids.tolist())].numpy()


_MODELS: dict[Path, Any] = {}


def test_tasks_become_complete_groups_with_the_engines_logprobs(engines: Engines, redis_url: str) -> None:
    """Guards against misaligned rollouts: a logprob shifted by one token, logprobs and ids of different
    lengths, text not matching the tokens, a group published with missing samples, or one engine left idle."""
    from transformers import AutoTokenizer

    prompt = _prompt(engines.model_a, "Which town did the committee choose?")
    cfg = _config(redis_url, "--sampling.max_response_len=24")
    groups, metrics, _ = asyncio.run(_generate(cfg, _tasks(prompt, num=4, num_samples=4)))
    assert sorted(g.group_id for g in groups) == ["g0", "g1", "g2", "g3"]
    tok = AutoTokenizer.from_pretrained(engines.model_a)
    used = set()
    for g in groups:
        assert g.task.prompt_ids_np().tolist() == prompt and len(g.samples) == 4 and g.worker_id == "w"
        for s in g.samples:
            ids, lps = s.response_ids_np(), s.logprobs_np()
            assert 1 <= len(ids) == len(lps) <= 24
            np.testing.assert_allclose(lps, _hf_logprobs(engines.model_a, prompt, ids), atol=2e-3)
            assert s.text == tok.decode(ids.tolist(), skip_special_tokens=False)
            assert s.weight_segments == [WeightSegment(0, 0)]
            if s.finish_reason == "length":
                assert (len(ids), s.status, s.task_unfinished) == (24, "truncated", True)
            else:
                assert s.finish_reason == "stop" and s.status == "completed"
                assert ids[-1] in (ENDOFTEXT_ID, IM_END_ID)
            used.add(s.engine_id)
    assert used == {"e0", "e1"}
    samples = metrics.registry.get_sample_value("longtrace_rollout_samples_total")
    assert samples == 16


def test_partial_rollout_across_a_weight_update_keeps_segments(engines: Engines, redis_url: str) -> None:
    """Guards against partial rollout bugs: tokens lost or duplicated on resume, the budget not reduced by what
    was generated (samples longer than max_new_tokens), and tokens labelled with the wrong weight version. The
    engines really change weights (another seed), so each token's logprob must match the model of its segment."""
    prompt = _prompt(engines.model_a, "Name the mayor.")
    n_new = LONG
    cfg = _config(redis_url, f"--sampling.max_response_len={n_new}", "--sampling.ignore_eos=true")
    urls = list(engines.urls().values())

    async def update_weights(router: Router, broker: Broker) -> None:
        await _wait_busy(router)
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            for url in urls:  # pause all engines, then update, then continue (SGLANG_API.md's order)
                (await http.post(f"{url}/pause_generation", json={"mode": "abort"})).raise_for_status()
            for url in urls:
                body = {"model_path": str(engines.model_b), "abort_all_requests": False}
                (await http.post(f"{url}/update_weights_from_disk", json=body)).raise_for_status()
                body = {"new_version": "1", "abort_all_requests": False}
                (await http.post(f"{url}/update_weight_version", json=body)).raise_for_status()
            for url in urls:
                (await http.post(f"{url}/continue_generation", json={})).raise_for_status()

    try:
        # two groups: a group's samples share one engine (prefix sharing), and the update must find both engines busy
        groups, _, _ = asyncio.run(_generate(cfg, _tasks(prompt, num=2, num_samples=4), during=update_weights))
    finally:
        _restore_weights(urls, engines.model_a)
    resumed = 0
    for s in (s for g in groups for s in g.samples):
        ids, lps = s.response_ids_np(), s.logprobs_np()
        assert len(ids) == len(lps) == n_new
        expected = _hf_logprobs(engines.model_b, prompt, ids)
        if s.num_resumes:
            resumed += 1
            [first, second] = s.weight_segments
            assert first == WeightSegment(0, 0) and second.policy_version == 1 and 0 < second.start < n_new
            expected[: second.start] = _hf_logprobs(engines.model_a, prompt, ids)[: second.start]
        else:
            assert s.weight_segments in ([WeightSegment(0, 0)], [WeightSegment(0, 1)])
            if s.weight_segments[0].policy_version == 0:
                expected = _hf_logprobs(engines.model_a, prompt, ids)
        np.testing.assert_allclose(lps, expected, atol=2e-3)
    assert resumed >= 1, "the pause came after every sample had finished: nothing was resumed"


async def _wait_busy(router: Router, min_s: float = 0.3) -> None:
    """Wait until every engine has requests out, then a little longer: the next step hits mid-generation."""
    deadline = time.monotonic() + 30
    while not (loads := router.snapshot()) or any(x.outstanding == 0 for x in loads):
        assert time.monotonic() < deadline, loads
        await asyncio.sleep(0.05)
    await asyncio.sleep(min_s)


def _restore_weights(urls: list[str], model: Path) -> None:
    with httpx.Client(timeout=60, trust_env=False) as http:
        for url in urls:
            http.post(f"{url}/update_weights_from_disk", json={"model_path": str(model)}).raise_for_status()
            http.post(f"{url}/update_weight_version", json={"new_version": "0", "abort_all_requests": False})


def test_worker_killed_mid_group_is_reclaimed_by_another(engines: Engines, redis_url: str) -> None:
    """Guards against losing a task when its worker dies (SIGKILL) mid-generation: the unacked task must be
    reclaimed by another worker after claim_idle_s and published exactly once, and the stream left empty."""
    prompt = _prompt(engines.model_a, "Who founded the company?")
    # 8 x LONG tokens: still generating when the kill lands, also on a fast machine (the group must be unfinished).
    common = [f"--sampling.max_response_len={8 * LONG}", "--sampling.ignore_eos=true", "--broker.claim_idle_s=2"]
    port = free_port()
    victim_cmd = [sys.executable, "-m", "rollout_server.worker", "--worker_id", "victim", "--metrics_port", str(port)]
    victim_cmd += _overrides(redis_url, *common)
    broker = connect(_config(redis_url).broker)
    broker.producer(TASKS, Task).publish(_tasks(prompt, num=2, num_samples=4))
    victim = subprocess.Popen(victim_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_metric(port, "longtrace_rollout_in_flight_groups", 2.0, victim)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    cfg = _config(redis_url, *common)
    groups, _, _ = asyncio.run(_generate(cfg, [], worker_id="rescuer", expect={"g0", "g1"}))
    assert sorted(g.group_id for g in groups) == ["g0", "g1"]
    assert {g.worker_id for g in groups} == {"rescuer"}
    assert broker.producer(TASKS, Task).backlog() == 0
    broker.close()


def _overrides(redis_url: str, *extra: str) -> list[str]:
    cfg_flags = [
        f"--broker.redis_url={redis_url}",
        f"--broker.run_id={RUN_ID}",
        "--broker.block_s=0.2",
        "--engines.registry_refresh_s=0.3",
        f"--sampling.stop_token_ids=[{ENDOFTEXT_ID}, {IM_END_ID}]",
    ]
    return [*cfg_flags, *extra]


def _wait_metric(port: int, name: str, at_least: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (proc.stderr.read() if proc.stderr else b"").decode()[-3000:]
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2, trust_env=False).text
        except httpx.HTTPError:
            text = ""
        for line in text.splitlines():
            if line.startswith(name + " ") and float(line.split()[1]) >= at_least:
                return
        time.sleep(0.1)
    raise AssertionError(f"{name} never reached {at_least}")


def test_a_task_whose_samples_keep_failing_is_retried_then_dead_lettered(engines: Engines, redis_url: str) -> None:
    """Guards against a failed task stranded in a live worker (issue 19, defect 2): when its samples failed (engine
    errors past `[retry]`) the task was left unacked among the worker's entries, whose lease the worker kept
    renewing, so with one worker it was never retried nor dead-lettered and its group never came. It must be
    generated again with backoff (`[task_retry]`), then go to `dead` with the engines' error, and the worker must go
    on with the next task. The engine here really fails every sample: its weight_version names no policy version."""
    url = engines.urls()["e0"]
    prompt = _prompt(engines.model_a, "Which bridge?")
    cfg = _config(
        redis_url, f'--engines.urls=["{url}"]', "--engines.use_registry=false", "--router.failure_threshold=100",
        "--sampling.max_response_len=4", "--retry.max_attempts=2", "--task_retry.max_attempts=3",
        "--task_retry.base_s=0.2",
    )  # fmt: skip
    [failing, after] = _tasks(prompt, num=2, num_samples=2)

    async def fail_then_recover(router: Router, broker: Broker) -> None:
        reader = broker.consumer(DEAD, DeadLetter, "test-dead", "test-dead")
        deadline = time.monotonic() + 60
        while not (letters := await asyncio.to_thread(reader.read, 4, 0.2)):
            assert time.monotonic() < deadline, "the failed task was never dead-lettered"
        [letter] = letters
        assert letter.msg.stream == TASKS and decode(letter.msg.payload, Task).group_id == failing.group_id
        assert "samples failed in 3 attempts (--task_retry.max_attempts)" in letter.msg.reason, letter.msg.reason
        assert "not-a-version" in letter.msg.reason, letter.msg.reason
        await asyncio.to_thread(_set_version, url, "0")
        await asyncio.to_thread(broker.producer(TASKS, Task).publish, [after])

    _set_version(url, "not-a-version")
    try:
        groups, metrics, _ = asyncio.run(
            _generate(cfg, [failing], during=fail_then_recover, expect={after.group_id}, wait_engines=False)
        )
    finally:
        _set_version(url, "0")
    assert [g.group_id for g in groups] == [after.group_id]
    value = metrics.registry.get_sample_value
    assert value("longtrace_rollout_failed_groups_total") == 3 and value("longtrace_rollout_dead_letters_total") == 1
    assert value("longtrace_rollout_retries_total", {"reason": "task"}) == 2


def _set_version(url: str, version: str) -> None:
    body = {"new_version": version, "abort_all_requests": False}
    httpx.post(f"{url}/update_weight_version", json=body, timeout=30, trust_env=False).raise_for_status()


def test_two_workers_with_free_slots_never_generate_the_same_group(engines: Engines, redis_url: str) -> None:
    """Guards against leases renewed only after they expired (issue 19, defect 3): a worker with free slots renewed
    the tasks it was generating only once they showed idle for claim_idle_s, so an idle second worker claimed them
    first and generated the same groups again (generations longer than claim_idle_s, workers throttled by
    admission). Every sample is counted where it is generated: each group's samples exactly once in all."""
    prompt = _prompt(engines.model_a, "Who signed the treaty?")
    cfg = _config(
        redis_url, f"--sampling.max_response_len={8 * LONG}", "--sampling.ignore_eos=true",
        "--broker.claim_idle_s=1", "--broker.block_s=0.5",
    )  # fmt: skip
    tasks = _tasks(prompt, num=2, num_samples=2)
    other = RolloutMetrics()
    start = time.monotonic()
    groups, metrics, _ = asyncio.run(_generate(cfg, tasks, others={"w2": other}))
    took_s = time.monotonic() - start
    assert took_s > 3 * cfg.broker.claim_idle_s, f"generations of {took_s:.1f}s do not outlast the leases"
    assert sorted(g.group_id for g in groups) == ["g0", "g1"]
    generated = sum(m.registry.get_sample_value("longtrace_rollout_samples_total") or 0 for m in (metrics, other))
    duplicates = sum(
        m.registry.get_sample_value("longtrace_rollout_duplicate_groups_total") or 0 for m in (metrics, other)
    )
    assert (generated, duplicates) == (4, 0), "a group was generated by both workers"


def test_an_oversized_group_is_dead_lettered_and_the_worker_goes_on(engines: Engines, redis_url: str) -> None:
    """Guards against an oversized group crash-looping the worker (issue 19, defect 4): `EntryTooLarge` from the
    publish killed the worker, and its restart met the same task again until max_deliveries. The task must go to
    `dead` with the group's size and the flag, and the worker go on with the next task."""
    prompt = _prompt(engines.model_a, "List every minister.")
    cfg = _config(redis_url, "--sampling.ignore_eos=true", "--broker.max_entry_mb=0.004")  # 4 KB
    big, small = _tasks(prompt, num=2, num_samples=4)
    big.sampling.max_new_tokens, small.sampling.max_new_tokens = 200, 4  # 4 x 200 tokens: over 4 KB
    small.num_samples = 1

    async def dead_letters(router: Router, broker: Broker) -> None:
        reader = broker.consumer(DEAD, DeadLetter, "test-dead", "test-dead")
        deadline = time.monotonic() + 60
        while not (letters := await asyncio.to_thread(reader.read, 4, 0.2)):
            assert time.monotonic() < deadline, "the oversized group's task was never dead-lettered"
        [letter] = letters
        assert decode(letter.msg.payload, Task).group_id == big.group_id
        assert re.search(r"too large: .* is [\d,]+ bytes encoded, over the limit of 0.004 MB \(--broker.max_entry_mb\)",
                         letter.msg.reason), letter.msg.reason  # fmt: skip

    groups, metrics, _ = asyncio.run(_generate(cfg, [big, small], during=dead_letters, expect={small.group_id}))
    assert [g.group_id for g in groups] == [small.group_id]
    assert metrics.registry.get_sample_value("longtrace_rollout_dead_letters_total") == 1


def test_sglang_router_mode_forwards_every_request_through_the_router(engines: Engines, redis_url: str) -> None:
    """Guards against the sglang-router mode (SGLang's Rust load balancer in front of the engines) breaking the
    native-API contract: groups must complete with aligned tokens and logprobs through the router."""
    pytest.importorskip("sglang_router", reason="sglang-router (dev dependency) is not installed")
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
    router = subprocess.Popen(
        [*cmd, "--worker-urls", *engines.urls().values()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert router.poll() is None and time.monotonic() < deadline, "sglang-router did not start"
            time.sleep(0.2)
        flags = ["--sampling.max_response_len=16", "--router.type=sglang_router", f"--router.url={url}"]
        cfg = _config(redis_url, *flags, builtin_router=False)
        prompt = _prompt(engines.model_a, "Where does the river rise?")
        groups, _, _ = asyncio.run(_generate(cfg, _tasks(prompt, num=2, num_samples=4), wait_engines=False))
    finally:
        router.terminate()
        router.wait(timeout=30)
    assert sorted(g.group_id for g in groups) == ["g0", "g1"]
    for s in (s for g in groups for s in g.samples):
        ids, lps = s.response_ids_np(), s.logprobs_np()
        assert 1 <= len(ids) == len(lps) <= 16 and s.engine_id == f"sglang-router@{url}"
        np.testing.assert_allclose(lps, _hf_logprobs(engines.model_a, prompt, ids), atol=2e-3)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_request_an_engine_rejects_dead_letters_the_task_with_the_engines_reason(
    engines: Engines, redis_url: str
) -> None:
    """Guards against a 4xx from the engine (here: Qwen3's default stop ids, outside the tiny vocabulary) being
    retried forever, or turned into empty zero-reward samples: the task goes to `dead` with the engine's words."""
    prompt = _prompt(engines.model_a, "Why?")
    cfg = load_config(
        RolloutConfig,
        overrides=[f"--broker.redis_url={redis_url}", f"--broker.run_id={RUN_ID}", "--broker.block_s=0.2"],
    )
    assert cfg.sampling.stop_token_ids is None  # the processor's 151643/151645 will be sent

    async def dead_letters(router: Router, broker: Broker) -> None:
        reader = broker.consumer(DEAD, DeadLetter, "test-dead", "test-dead")
        deadline = time.monotonic() + 30
        while not (letters := await asyncio.to_thread(reader.read, 4, 0.2)):
            assert time.monotonic() < deadline
        [letter] = letters
        assert letter.msg.stream == TASKS and "stop_token_ids" in letter.msg.reason, letter.msg.reason

    groups, metrics, _ = asyncio.run(_generate(cfg, _tasks(prompt, 1, 2), during=dead_letters, expect=set()))
    assert groups == [] and metrics.registry.get_sample_value("longtrace_rollout_dead_letters_total") == 1


def test_engine_killed_mid_generation_every_group_completes_once(engines: Engines, redis_url: str) -> None:
    """Guards against an engine crash losing or doubling work: requests on the dead engine must be retried on
    the other one, the dead engine taken out of rotation, and each group published exactly once.
    (Runs last: it kills one of the module's engines.)"""
    prompt = _prompt(engines.model_a, "What grew by 12 percent?")
    n_new = LONG
    cfg = _config(redis_url, f"--sampling.max_response_len={n_new}", "--sampling.ignore_eos=true")
    victim_launcher = engines.launchers["e1"]
    [victim_engine] = psutil.Process(victim_launcher.pid).children()

    async def kill_engine(router: Router, broker: Broker) -> None:
        await _wait_busy(router)
        os.kill(victim_engine.pid, signal.SIGKILL)

    groups, metrics, router = asyncio.run(_generate(cfg, _tasks(prompt, num=4, num_samples=4), during=kill_engine))
    assert sorted(g.group_id for g in groups) == ["g0", "g1", "g2", "g3"]  # each exactly once
    for s in (s for g in groups for s in g.samples):
        assert len(s.response_ids_np()) == len(s.logprobs_np()) == n_new
        assert s.status == "truncated"
    assert (metrics.registry.get_sample_value("longtrace_rollout_retries_total", {"reason": "engine_error"}) or 0) >= 1
    assert victim_launcher.wait(timeout=30) != 0  # the launcher noticed and exited (deregistering the engine)
    assert "e1" not in engines.urls(wait_for_all=False)
