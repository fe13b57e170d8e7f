"""The reward stream worker on a real Redis: groups in `rollouts` come out of `scored` with the right rewards,
a replica SIGKILLed mid-group loses and duplicates nothing, and judge failures end in the dead stream."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.base import DEAD, ROLLOUTS, SCORED, Broker
from broker.factory import connect
from broker.schemas import (
    DeadLetter,
    Group,
    RewardInfo,
    Sample,
    SampleReward,
    ScoredGroup,
    Task,
    TextSplit,
    encode,
    pack_ids,
)
from broker.settings import BrokerConfig
from reward_service.config import RewardConfig
from reward_service.judges.llm import LlmJudge
from reward_service.judges.rule import RuleJudge
from reward_service.worker import RewardWorker
from tests.helpers.dist import free_port
from tests.helpers.judge_stub import StubJudgeApi

BROKER_FLAGS = {"claim_idle_s": 1.0, "block_s": 0.1, "socket_timeout_s": 5.0}


def _sample(content: str, **kw: Any) -> Sample:
    text = f"R\n</think>\n\n{content}<|im_end|>"
    fields: dict[str, Any] = {
        "response_ids": pack_ids([1, 2, 3]),
        "logprobs": b"\x00" * 12,
        "text": text,
        "finish_reason": "stop",
        "status": "completed",
        "split": TextSplit.of(text, "R", content),  # the reasoning and content a processor would split off
    }
    fields.update(kw)
    return Sample(**fields)


def _group(group_id: str, samples: list[Sample], rubrics: list[str] | None = None, dataset: str = "longqa") -> Group:
    info = RewardInfo(question="Which one?", rubrics=rubrics or ["Alpha", "Beta"], dataset_name=dataset)
    task = Task(run_id="t", group_id=group_id, dataset_index=0, prompt_ids=pack_ids(range(64)), label="Beta",
                reward_info=info, policy_version=0)  # fmt: skip
    return Group(task=task, samples=samples)


def standard(i: int) -> list[Sample]:
    """Correct with every entity (raw 1), wrong with half (raw .5), truncated: positive-only rewards 1, 0, 0.
    The answers differ per group, so the judge cache does not fold groups together."""
    return [
        _sample(f"Alpha and Beta ({i})"),
        _sample(f"Alpha alone ({i})"),
        _sample("Beta", status="truncated", finish_reason="length"),
    ]


EXPECTED = [1.0, 0.0, 0.0]


@pytest.fixture
def broker_config(redis_url: str) -> BrokerConfig:
    return BrokerConfig(redis_url=redis_url, run_id=f"rw-{uuid.uuid4().hex[:8]}", **BROKER_FLAGS)  # type: ignore[arg-type]


@pytest.fixture
def broker(broker_config: BrokerConfig) -> Iterator[Broker]:
    b = connect(broker_config)
    yield b
    b.close()


def _drain(broker: Broker, stream: str, kind: Any, want: int, timeout_s: float = 30.0) -> list[Any]:
    """Read (and ack) `want` messages of `stream`, then check for a second that nothing more arrives."""
    consumer = broker.consumer(stream, kind, "inspect", "t")
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        entries = consumer.read(16, block_s=0.2)
        consumer.ack([e.id for e in entries])
        got += [e.msg for e in entries]
    extra = consumer.read(16, block_s=min(1.0, timeout_s))
    return got + [e.msg for e in extra]


def _rewards(scored: ScoredGroup) -> list[float]:
    return [round(r.reward, 9) for r in scored.rewards]


def _run_worker(config: RewardConfig, broker: Broker, judge: Any, until: Any, timeout_s: float = 30.0) -> RewardWorker:
    async def main() -> RewardWorker:
        worker = RewardWorker(config, broker, judge)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + timeout_s
        while not until(worker) and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await judge.aclose()
        return worker

    return asyncio.run(main())


def test_groups_are_scored_and_acked(broker: Broker, broker_config: BrokerConfig) -> None:
    """Guards against wrong rewards on the stream path, lost or extra groups, and entries left unacked."""
    config = RewardConfig(broker=broker_config)
    groups = [_group(f"g{i}", standard(i)) for i in range(5)]
    broker.producer(ROLLOUTS, Group).publish(groups)
    worker = _run_worker(config, broker, RuleJudge(config.judge), lambda w: w.num_scored >= 5)  # type: ignore[arg-type]
    assert worker.num_scored == 5 and worker.num_dead == 0
    scored = _drain(broker, SCORED, ScoredGroup, 5)
    assert sorted(s.group_id for s in scored) == [f"g{i}" for i in range(5)]
    for s in scored:
        assert _rewards(s) == EXPECTED
        assert [r.zeroed_reason for r in s.rewards] == ["", "", "truncated"]
        assert s.rewards[1].rubric_reward == 0.5 and s.scorer_id == worker.name
        assert s.group.task.prompt_ids_np().tolist() == list(range(64))
    assert broker.producer(ROLLOUTS, Group).backlog() == 0


def test_judge_failure_dead_letters_after_retries(broker: Broker, broker_config: BrokerConfig) -> None:
    """Guards against a failing judge turning into reward 0, retrying forever, or losing the group; and a
    group whose reward info cannot be scored must go to the dead stream at once with the reason."""
    stub = StubJudgeApi().start()
    try:
        stub.default = "500"
        config = RewardConfig.model_validate(
            {
                "broker": broker_config.model_dump(),
                "judge": {"kind": "llm", "base_url": stub.url, "retry": {"max_attempts": 1, "base_s": 0.01}},
                "worker": {"retry": {"max_attempts": 3, "base_s": 0.01}},
            }
        )
        bad_info = _group("bad", [_sample("x")], rubrics=["chunk-a"], dataset="longrlvr")
        broker.producer(ROLLOUTS, Group).publish([_group("g-fail", [_sample("Beta")]), bad_info])
        judge = LlmJudge(config.judge)  # type: ignore[arg-type]
        worker = _run_worker(config, broker, judge, lambda w: w.num_dead >= 2)
    finally:
        stub.stop()
    assert worker.num_dead == 2 and worker.num_scored == 0
    assert len(stub.requests) == 3  # 1 attempt + 2 group retries, one judged sample each
    dead = {d.entry_id: d for d in _drain(broker, DEAD, DeadLetter, 2)}
    reasons = sorted(d.reason for d in dead.values())
    assert "cannot score group" in reasons[0] and "chunk ids" in reasons[0]
    assert "judge failed after 3 attempts" in reasons[1] and "HTTP 500" in reasons[1]
    assert _drain(broker, SCORED, ScoredGroup, 0, timeout_s=0.5) == []
    assert broker.producer(ROLLOUTS, Group).backlog() == 0


def _spawn_worker(
    broker_config: BrokerConfig, stub: StubJudgeApi, name: str, log: Path, metrics_port: int = 0
) -> subprocess.Popen[bytes]:
    flags = [f"--broker.{k}={v}" for k, v in BROKER_FLAGS.items()] + [f"--worker.metrics_port={metrics_port}"]
    cmd = [sys.executable, "-m", "deploy.cli", "reward", "worker", f"--broker.redis_url={broker_config.redis_url}",
           f"--broker.run_id={broker_config.run_id}", *flags, "--judge.kind=llm", f"--judge.base_url={stub.url}",
           "--judge.timeout_s=60", f"--worker.consumer={name}"]  # fmt: skip
    with log.open("ab") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_replica_killed_mid_group_loses_and_duplicates_nothing(
    broker: Broker, broker_config: BrokerConfig, tmp_path: Path
) -> None:
    """Guards against losing the groups a dead replica held (pending entries must be reclaimed by another
    replica) and against publishing a group twice when the dead replica had already published it; and against a
    worker whose counters nobody can scrape (its /metrics must count the groups it scored)."""
    stub = StubJudgeApi().start()
    log = tmp_path / "workers.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        stub.default = "hang"  # replica A gets stuck inside its groups' judge calls
        groups = [_group(f"g{i}", standard(i)) for i in range(3)]
        broker.producer(ROLLOUTS, Group).publish(groups)
        procs.append(_spawn_worker(broker_config, stub, "A", log))
        deadline = time.monotonic() + 30
        while len(stub.requests) < 6:  # 3 groups x 2 judged samples: A holds all three mid-group
            assert time.monotonic() < deadline and procs[0].poll() is None, log.read_text()
            time.sleep(0.05)
        # as if A had published g0 and died before acking it
        early = ScoredGroup(group=groups[0], rewards=[SampleReward(reward=9, outcome_reward=1, rubric_reward=1)] * 3,
                            scorer_id="A")  # fmt: skip
        broker.producer(SCORED, ScoredGroup).publish([early], dedup_key=lambda m: m.group_id)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        stub.default = "judge"
        stub.release()
        metrics_port = free_port()
        procs.append(_spawn_worker(broker_config, stub, "B", log, metrics_port))
        scored = _drain(broker, SCORED, ScoredGroup, 3, timeout_s=60)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5, trust_env=False).text
        counted = re.search(r'^reward_worker_groups_total\{result="scored"\} ([\d.]+)$', text, re.M)
        assert counted and float(counted.group(1)) >= 2, text[-2000:]  # g1 and g2 (g0's publish was a duplicate)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=20) == 0, log.read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        stub.stop()
    assert sorted(s.group_id for s in scored) == ["g0", "g1", "g2"], log.read_text()
    by_id = {s.group_id: s for s in scored}
    assert by_id["g0"].scorer_id == "A"  # B's publish of g0 was dropped by the dedup key
    assert _rewards(by_id["g1"]) == EXPECTED and _rewards(by_id["g2"]) == EXPECTED
    assert by_id["g1"].scorer_id == "B"
    assert broker.producer(ROLLOUTS, Group).backlog() == 0
    assert _drain(broker, DEAD, DeadLetter, 0, timeout_s=0.5) == []


def test_scored_group_over_the_publish_limit_is_dead_lettered_and_the_worker_goes_on(
    broker_config: BrokerConfig,
) -> None:
    """Guards against defect 4 (issue 19), reward side: the worker checked the size of the Group it read, not of the
    larger ScoredGroup it publishes, so a group just under `--broker.max_entry_mb` made the publish raise
    EntryTooLarge and crash-looped the worker. It goes to `dead` with the size and the flag; the next group is
    scored."""
    limit_mb = 0.02
    small = broker_config.model_copy(update={"max_entry_mb": limit_mb})
    limit = int(limit_mb * 1024 * 1024)
    text = "x" * limit
    while len(encode(big := _group("big", [_sample(text)]))) > limit - 16:  # just under the limit as a Group
        text = text[: -max(1, (len(encode(big)) - limit + 16) // 2)]
    assert len(encode(ScoredGroup(group=big, rewards=[SampleReward(reward=0, outcome_reward=0, rubric_reward=0)],
                                  scorer_id="x"))) > limit  # fmt: skip
    b = connect(small)
    try:
        b.producer(ROLLOUTS, Group).publish([big, _group("g0", standard(0))])
        config = RewardConfig(broker=small)
        worker = _run_worker(config, b, RuleJudge(config.judge), lambda w: w.num_scored + w.num_dead >= 2)  # type: ignore[arg-type]
        assert (worker.num_scored, worker.num_dead) == (1, 1)
        [dead] = _drain(b, DEAD, DeadLetter, 1)
        assert dead.stream == ROLLOUTS and "--broker.max_entry_mb" in dead.reason and "MB" in dead.reason
        assert [s.group_id for s in _drain(b, SCORED, ScoredGroup, 1)] == ["g0"]
        assert b.producer(ROLLOUTS, Group).backlog() == 0
    finally:
        b.close()


def test_slow_judge_with_two_workers_scores_each_group_once(broker_config: BrokerConfig) -> None:
    """Guards against leases renewed only once expired (defect 3 of issue 19, reward side): with free slots the
    worker touched its entries only when XPENDING showed them idle for `claim_idle_s`, so a second replica
    claimed groups still being judged (longer than `claim_idle_s`) and judged them again. Each group must be
    judged by one replica only."""
    stub = StubJudgeApi().start()
    stub.default = "sleep:2.5"  # 2.5 x claim_idle_s
    cfg = RewardConfig.model_validate(
        {"broker": broker_config.model_dump(), "judge": {"kind": "llm", "base_url": stub.url}}
    )
    brokers = [connect(broker_config) for _ in range(2)]
    try:

        async def main() -> list[RewardWorker]:
            stop = asyncio.Event()
            judges = [LlmJudge(cfg.judge) for _ in range(2)]  # type: ignore[arg-type]
            workers = [RewardWorker(cfg.model_copy(update={"worker": cfg.worker.model_copy(update={"consumer": n})}),
                                    b, j) for n, b, j in zip("AB", brokers, judges, strict=True)]  # fmt: skip
            tasks = [asyncio.create_task(workers[0].run(stop))]
            # A looks for idle entries once a second from its start: publishing half-way makes B's look come first
            # once the groups have been idle for claim_idle_s (as in a run, where the phases are arbitrary).
            await asyncio.sleep(0.5)
            brokers[0].producer(ROLLOUTS, Group).publish([_group(f"g{i}", standard(i)) for i in range(3)])
            deadline = time.monotonic() + 20
            while len(stub.requests) < 6:  # A holds the three groups, with slots to spare, inside its judge calls
                assert time.monotonic() < deadline and not tasks[0].done()
                await asyncio.sleep(0.02)
            tasks.append(asyncio.create_task(workers[1].run(stop)))
            while sum(w.num_scored for w in workers) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # a group claimed by B would be judged again meanwhile
            stop.set()
            await asyncio.gather(*tasks)
            for j in judges:
                await j.aclose()
            return workers

        a, b = asyncio.run(main())
    finally:
        for br in brokers:
            br.close()
        stub.stop()
    responses = [r["messages"][0]["content"].rsplit("[response]: ", 1)[1].split("\n\n")[0] for r in stub.requests]
    assert sorted(responses) == sorted({*responses}) and len(responses) == 6, responses
    assert (a.num_scored, b.num_scored) == (3, 0)


def test_scoring_past_its_deadline_is_dead_lettered_after_retries(broker: Broker, broker_config: BrokerConfig) -> None:
    """Guards against scoring without a deadline that can fire (defect 5 of issue 19, worker side): a try at a
    group that takes longer than `worker.score_timeout_s` fails, is retried, then goes to `dead` with the reason
    and the flag, never a reward of 0."""
    stub = StubJudgeApi().start()
    try:
        stub.default = "sleep:5"
        config = RewardConfig.model_validate(
            {
                "broker": broker_config.model_dump(),
                "judge": {"kind": "llm", "base_url": stub.url, "retry": {"max_attempts": 1}},
                "worker": {"score_timeout_s": 0.3, "retry": {"max_attempts": 2, "base_s": 0.01}},
            }
        )
        broker.producer(ROLLOUTS, Group).publish([_group("g-slow", [_sample("Beta")])])
        judge = LlmJudge(config.judge)  # type: ignore[arg-type]
        worker = _run_worker(config, broker, judge, lambda w: w.num_dead >= 1)
    finally:
        stub.stop()
    assert (worker.num_dead, worker.num_scored) == (1, 0)
    [dead] = _drain(broker, DEAD, DeadLetter, 1)
    assert "longer than 0.3 s" in dead.reason and "--worker.score_timeout_s" in dead.reason
    assert "2 attempts" in dead.reason
    assert _drain(broker, SCORED, ScoredGroup, 0, timeout_s=0.5) == []
