"""The async bench's per-run figures and its bound (experiments/bench_async_measure.py, bench_async_summary.py)."""

from __future__ import annotations

import pytest

from experiments.bench_async_measure import cpu_in, summarize_run
from experiments.bench_async_summary import combine


def _metrics(times: list[float]) -> list[dict[str, float]]:
    return [{"step": i + 1, "time_s": t, "step_s": 0.1, "weight_sync/total_s": 0.05} for i, t in enumerate(times)]


def test_rates_and_work_are_totals_over_the_span_not_medians_of_bursty_steps() -> None:
    """Guards against the bench's first version, which took 60 / the median step interval as the rate: an async
    learner's steps come in bursts (two quick steps, then a long wait), so the median interval (0.2 s here) made the
    rate 2.5x the real one (6 steps in 6 s), and the median judge calls per step halved what the judge did."""
    times = [0.0, 1.0, 1.2, 1.4, 4.0, 4.2, 4.4, 7.0, 8.0]  # measured windows: (1.0, 1.2] ... (4.4, 7.0]
    calls = [(1.0 + 0.01 * k, 1.1 + 0.01 * k) for k in range(12)] + [(4.5, 6.5)] * 3  # 12 short calls, 3 long
    cpu = [(0.0, 0.0), (10.0, 20.0)]  # the run's tree: 2 cores busy the whole time
    machine = [(0.0, 0.0), (10.0, 20.0)]
    r = summarize_run(_metrics(times), [], calls, warmup_steps=2, judge_concurrency=2, cpu_samples=cpu,
                      machine_samples=machine)  # fmt: skip
    assert r["measured_steps"] == 6 and r["step_s"] == pytest.approx(1.0) and r["steps_per_min"] == pytest.approx(60)
    assert r["step_s_median"] == pytest.approx(0.2)
    assert r["judge_calls_per_step"] == pytest.approx(15 / 6)
    assert r["judge_work_s_per_step"] == pytest.approx((12 * 0.1 + 3 * 2.0) / 2 / 6)
    assert r["cpu_s_per_step"] == pytest.approx(2.0) and r["learner_s_per_step"] == pytest.approx(0.15)


def test_the_ideal_is_the_sync_step_over_the_busiest_resource_of_the_async_run() -> None:
    """Guards against an ideal that is not a bound: it must come from the resource the async run used most per step
    (the judge's slot-seconds, the machine's CPU over its cores, the learner's train + push chain), so a measured
    speedup above it means a resource was missed; and against a CPU series without samples around the window
    reading as 0 CPU instead of unknown."""
    sync = {"steps_per_min": 10.0, "step_s": 6.0, "busy_s_per_step": {"generation": 1.0, "scoring": 4.0}}
    asyn = {"steps_per_min": 15.0, "step_s": 4.0, "judge_work_s_per_step": 3.8, "cpu_s_per_step": 1.0,
            "machine_cpu_s_per_step": 3.0, "learner_s_per_step": 0.4}  # fmt: skip
    r = combine(sync, asyn, cores=2)
    assert r["bound_by"] == "judge" and r["bound_step_s"] == 3.8 and r["ideal_speedup"] == pytest.approx(6 / 3.8, 1e-3)
    assert r["ratio"] == pytest.approx(1.5 / (6 / 3.8), rel=1e-2) and r["bounds_s"]["cpu"] == 1.5
    assert r["others_cpu_s_per_step"] == 2.0
    r = combine(sync, {**asyn, "machine_cpu_s_per_step": 9.0}, cores=2)  # a loaded machine: the CPU binds
    assert r["bound_by"] == "cpu" and r["bound_step_s"] == 4.5
    assert cpu_in([(1.0, 0.0), (2.0, 1.0)], 0.5, 1.5) != cpu_in([(1.0, 0.0), (2.0, 1.0)], 0.5, 1.5)  # nan: unknown
