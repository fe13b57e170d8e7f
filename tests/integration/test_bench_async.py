"""`longtrace bench async`: the delayed judge stub against the real LLM judge client, the bench's config checks and
interval arithmetic, and one tiny end-to-end bench (two real `longtrace up` runs: engines, workers, torchrun learner)."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.config import ConfigError, load_config
from experiments import bench_async_cli
from experiments.bench_async import DEFAULT_CONFIG, BenchAsyncConfig, run_bench
from experiments.bench_async_measure import STAGES, union_length
from experiments.judge_stub import JudgeStub, JudgeStubConfig
from reward_service.config import LlmJudgeConfig
from reward_service.judges.llm import LlmJudge


def test_judge_stub_answers_the_reference_prompt_with_delay_and_a_concurrency_limit() -> None:
    """Guards against a stand-in judge that the real LLM judge client cannot parse, that answers without its delay,
    or that serves more calls at once than its capacity (the bench's scoring stage would be mis-modelled)."""
    stub = JudgeStub(JudgeStubConfig(delay_s=0.3, concurrency=2))
    with stub.serve() as server:
        judge = LlmJudge(LlmJudgeConfig(base_url=f"{server.url}/v1", cache_size=0, extra_body={}, timeout_s=10.0))

        async def ask_four() -> list[bool]:
            try:
                answers = [
                    ("Q1", "Paris", "It is Paris."),
                    ("Q2", "Rome", "Paris"),
                    ("Q3", "C18", "E1 C18"),
                    ("Q4", "x", "y"),
                ]
                return list(await asyncio.gather(*(judge.judge(*a) for a in answers)))
            finally:
                await judge.aclose()

        t0 = time.monotonic()
        verdicts = asyncio.run(ask_four())
        elapsed = time.monotonic() - t0
        bad = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}, timeout=5.0)
    assert verdicts == [True, False, True, False]
    assert elapsed >= 2 * 0.3 - 0.01  # four calls, two at a time
    calls = stub.snapshot()
    assert len(calls) == 4 and all(c.end_s - c.start_s >= 0.29 for c in calls)
    for c in calls:  # never more than 2 slots held at once (the count of calls holding one when c starts)
        assert sum(o.start_s <= c.start_s < o.end_s for o in calls) <= 2
    assert bad.status_code == 400 and "expected" in bad.text


def test_union_length_merges_and_clips() -> None:
    """Guards against busy time counted twice where groups overlap, or outside the step's window."""
    spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (10.0, 11.0)]
    assert union_length(spans, 0.0, 20.0) == pytest.approx(5.0)
    assert union_length(spans, 2.5, 5.5) == pytest.approx(1.0)
    assert union_length([], 0.0, 1.0) == 0.0


@pytest.mark.parametrize(
    ("override", "flag"),
    [
        (["--up.run_dir", "x"], "--up.run_dir"),
        (["--up.learner.config.data.max_staleness", "1"], "--up.learner.config.data.max_staleness"),
        (["--up.reward.config.judge.kind", "rule"], "--up.reward.config.judge.kind"),
        (["--warmup_steps", "11"], "--warmup_steps"),
        (["--model_path", "m"], "--model_path"),
        (["--up.learner.config.optim.lrr", "1"], "optim.lrr"),
    ],
)
def test_config_names_the_bad_flag(override: list[str], flag: str) -> None:
    """Guards against a bench config that silently drops what the bench must set itself (run dirs, staleness, the
    judge URL), or reports a typo without the flag to fix."""
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        load_config(BenchAsyncConfig, DEFAULT_CONFIG, override)


def test_cli_registers_bench_async() -> None:
    """Guards against `longtrace bench async` missing its flags or refusing config overrides."""
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    benches = commands.add_parser("bench").add_subparsers(dest="bench")
    bench_async_cli.register(commands, benches)
    args, rest = parser.parse_known_args(["bench", "async", "--json", "--steps", "4"])
    assert args.json and args.overrides is True and rest == ["--steps", "4"]


@pytest.mark.slow
def test_tiny_bench_reports_consistent_numbers(tmp_path: Path) -> None:
    """Guards against a bench whose numbers cannot be trusted: a missing field, a stage measured as 0 (the observer
    saw no groups, or metrics were misread), no CPU measured (the sampler saw no process), an ideal that is not the
    sync step over the largest resource bound, a speedup that is not the ratio of the rates, a sync run that trains
    on stale data, or an async run beyond its staleness bound."""
    cfg = load_config(
        BenchAsyncConfig,
        DEFAULT_CONFIG,
        [
            "--run_dir", str(tmp_path),
            "--steps", "5",
            "--warmup_steps", "1",
            "--judge.delay_s", "0.3",
            "--warm_start.steps", "40",
            "--up.prepare.num_train", "128",
            "--run_timeout_s", "400",
        ],
    )  # fmt: skip
    result: dict[str, Any] = run_bench(cfg)
    for key in ("sync_steps_per_min", "async_steps_per_min", "speedup", "ideal_speedup", "ratio", "config"):
        assert key in result, key
    assert result["speedup"] == pytest.approx(result["async_steps_per_min"] / result["sync_steps_per_min"], rel=0.01)
    assert result["ratio"] == pytest.approx(result["speedup"] / result["ideal_speedup"], rel=0.01)
    bounds = result["bounds_s"]
    assert set(bounds) == {"judge", "cpu", "learner"} and all(v > 0 for v in bounds.values()), bounds
    assert result["bound_step_s"] == max(bounds.values()) and result["bound_by"] in bounds
    sync_step = 60 / result["sync_steps_per_min"]
    assert result["ideal_speedup"] == pytest.approx(sync_step / result["bound_step_s"], rel=0.02)
    # the CPU bound is the tree's CPU seconds per step over the cores: at most the step times the cores
    assert 0 < result["async"]["cpu_s_per_step"] <= 1.1 * result["cores"] * 60 / result["async_steps_per_min"]
    for mode in ("sync", "async"):
        run = result[mode]
        assert set(run["busy_s_per_step"]) == set(STAGES)
        assert all(v > 0 for v in run["busy_s_per_step"].values()), (mode, run["busy_s_per_step"])
        assert run["groups_observed"] >= cfg.steps * result["config"]["groups_per_step"]
        assert run["measured_steps"] == cfg.steps - cfg.warmup_steps - 1
    assert result["sync"]["max_staleness_seen"] == 0 and result["sync"]["groups_dropped_stale"] == 0
    assert result["async"]["max_staleness_seen"] <= cfg.async_max_staleness
    assert result["sync"]["judge_calls"] > 0  # the warm start makes answers the judge sees
    assert (Path(result["sync"]["run_dir"]).parent / "result.json").is_file()
