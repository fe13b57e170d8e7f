"""What the async bench measures of one run: ScoredObserver copies every ScoredGroup off the run's `scored` stream
while it runs (XRANGE through the broker's read-only view: reads, never consumes), and summarize_run turns those
records, the learner's metrics and the judge stub's calls into per-step medians.

Per-stage busy time is measured per learner step, on the step's window (t[i-1], t[i]] of metrics.jsonl:
- generation: the union of the groups' generation intervals [end - Group.rollout_s, end], where the end is the
  scored entry's XADD time (a ms timestamp) minus ScoredGroup.score_s (the reward worker takes a group as soon
  as it is published: its concurrency exceeds the groups in flight);
- scoring: the union of the groups' scoring intervals [XADD time - score_s, XADD time];
- training: the learner's `step_s` (old logprobs, forward-backward, optimizer step);
- weight sync: the learner's `weight_sync/total_s` (export, pause, broadcast, resume);
- CPU: the CPU seconds of the run's whole process tree (`longtrace up` and every descendant: engines, learner
  ranks, workers, Redis) in the window, from CpuSampler's samples. A process that exits between two samples takes
  its last interval with it, so this can only undercount: a bound built on it stays a bound.
The steps measured are warmup_steps + 1 .. steps - 1 (the last one also writes the run's only checkpoint). Stage
busy times are medians over them; steps/min and the work each resource did per step (judge slot-seconds, CPU
seconds of the run's tree and of the whole machine, the learner's train + push) are totals over the measured span
divided by its steps (an async learner's steps come in bursts: the median interval would overstate its rate).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from experiments.bench_async_plan import BenchError
from experiments.side_reads import side_reads_config

log = logging.getLogger(__name__)

STAGES = ("generation", "scoring", "training", "weight_sync")


def _start(poller: Any, name: str) -> None:
    """Run `poller._run` on a daemon thread (the observers below: dataclasses with `_stop` and `_thread`)."""
    poller._thread = threading.Thread(target=poller._run, name=name, daemon=True)
    poller._thread.start()


def _stop(poller: Any) -> None:
    poller._stop.set()
    if poller._thread is not None:
        poller._thread.join(timeout=10)


@dataclass(frozen=True)
class ScoredRecord:
    """What the bench keeps of one ScoredGroup (times are time.time() seconds)."""

    group_id: str
    scored_s: float  # XADD time of the scored entry
    score_s: float
    rollout_s: float
    admitted_version: int
    group_version: int  # Group.group_version: what the learner's staleness counts
    created_s: float

    @property
    def generation(self) -> tuple[float, float]:
        end = self.scored_s - self.score_s
        return end - self.rollout_s, end

    @property
    def scoring(self) -> tuple[float, float]:
        return self.scored_s - self.score_s, self.scored_s


@dataclass
class ScoredObserver:
    """A thread that copies new entries of the run's `scored` stream every `poll_s` (the broker's read-only view,
    no consumer group: the learner's reads and acks are untouched). It waits for Redis to come up and tolerates
    it going away."""

    redis_url: str
    run_id: str
    poll_s: float
    records: list[ScoredRecord] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ScoredObserver:
        _start(self, f"observer-{self.run_id}")
        return self

    def stop(self) -> None:
        _stop(self)

    def _run(self) -> None:
        from broker.base import SCORED, Broker, BrokerError
        from broker.factory import connect
        from broker.schemas import ScoredGroup

        cfg = side_reads_config(self.redis_url, self.run_id, connect_timeout_s=2.0)
        broker: Broker | None = None
        last = "0-0"
        while not self._stop.wait(self.poll_s):
            try:
                if broker is None:
                    broker = connect(cfg)  # pings: fails until the launcher's Redis is up
                page = broker.view(SCORED).peek(ScoredGroup, last, count=1000)
            except BrokerError as e:
                log.debug("scored stream not readable yet: %s", e)
                continue
            last = page.last_id
            self.errors += len(page.undecodable)
            for entry in page.entries:
                sg = entry.msg
                g = sg.group
                self.records.append(
                    ScoredRecord(
                        group_id=sg.group_id,
                        scored_s=int(entry.id.split("-")[0]) / 1000,  # the entry id's time: when it was scored
                        score_s=sg.score_s,
                        rollout_s=g.rollout_s,
                        admitted_version=g.task.policy_version,
                        group_version=g.group_version,
                        created_s=g.task.created_s,
                    )
                )
        if broker is not None:
            broker.close()


@dataclass
class CpuSampler:
    """A thread that samples the CPU seconds (user + system) of process `pid` and all its descendants every `poll_s`,
    as (time.time(), cpu_s) pairs, and the whole machine's busy CPU seconds at the same times (`machine`: the run's
    and every other process's, which on a shared machine takes cores the run cannot use)."""

    pid: int
    poll_s: float = 0.5
    samples: list[tuple[float, float]] = field(default_factory=list)
    machine: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _seen: dict[int, float] = field(default_factory=dict)  # per process: its CPU seconds at its last sample

    def start(self) -> CpuSampler:
        _start(self, f"cpu-{self.pid}")
        return self

    def stop(self) -> None:
        _stop(self)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while True:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    self._seen[p.pid] = max(self._seen.get(p.pid, 0.0), t.user + t.system)
                except psutil.Error:
                    continue  # exited since the listing: its CPU up to its last sample stays counted
            # Totals over every process ever seen (exited ones keep their last value), so the series never drops.
            now = time.time()
            self.samples.append((now, sum(self._seen.values())))
            m = psutil.cpu_times()
            self.machine.append((now, m.user + m.nice + m.system + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)))
            if self._stop.wait(self.poll_s):
                return


def cpu_in(samples: list[tuple[float, float]], lo: float, hi: float) -> float:
    """CPU seconds used in [lo, hi], interpolated between the samples (nan without samples around the window)."""
    if len(samples) < 2 or samples[0][0] > lo or samples[-1][0] < hi:
        return math.nan
    ts, cpu = [t for t, _ in samples], [c for _, c in samples]
    return float(np.interp(hi, ts, cpu) - np.interp(lo, ts, cpu))


def union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of `intervals` clipped to [lo, hi]."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if cur_b is None or a > cur_b:
            if cur_b is not None and cur_a is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None and cur_a is not None:
        total += cur_b - cur_a
    return total


def max_staleness_seen(metrics: list[dict[str, Any]]) -> int:
    """The largest lag (versions) of any group the learner trained on (metrics' staleness/<lag> counts)."""
    lags = [int(k.split("/", 1)[1]) for m in metrics for k, v in m.items() if k.startswith("staleness/") and v]
    return max(lags, default=0)


def summarize_run(
    metrics: list[dict[str, Any]],
    records: list[ScoredRecord],
    judge_calls: list[tuple[float, float]],
    warmup_steps: int,
    judge_concurrency: int,
    cpu_samples: list[tuple[float, float]] | None = None,
    machine_samples: list[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """One run's figures over its measured steps (see the module docstring): stage busy times are medians of the
    steps; the step rate and the resources' work per step are totals over the measured span / its steps."""
    rows = sorted(metrics, key=lambda m: m["step"])
    steps = [m["step"] for m in rows]
    if steps != list(range(1, len(rows) + 1)) or len(rows) < warmup_steps + 2:
        raise BenchError(f"metrics cover steps {steps[:3]}...{steps[-3:]}: too few to measure after warm-up")
    t = [float(m["time_s"]) for m in rows]
    gen = [r.generation for r in records]
    score = [r.scoring for r in records]
    per_step: dict[str, list[float]] = {s: [] for s in (*STAGES, "judge", "learner")}
    dts, calls = [], []
    for i in range(warmup_steps, len(rows) - 1):  # index i is step i + 1; the last step (checkpoint) left out
        lo, hi = t[i - 1], t[i]
        dts.append(hi - lo)
        per_step["generation"].append(union_length(gen, lo, hi))
        per_step["scoring"].append(union_length(score, lo, hi))
        per_step["training"].append(float(rows[i]["step_s"]))
        per_step["weight_sync"].append(float(rows[i].get("weight_sync/total_s") or 0.0))
        per_step["judge"].append(union_length(judge_calls, lo, hi))
        calls.append(sum(lo < end <= hi for _, end in judge_calls))
        per_step["learner"].append(per_step["training"][-1] + per_step["weight_sync"][-1])
    busy = {s: statistics.median(v) for s, v in per_step.items() if s in STAGES}
    # Rates and resource work over the whole measured span, not medians of per-step values: an async learner's steps
    # come in bursts (a step whose groups are ready waits for nothing), so the median interval understates the mean.
    lo, hi, n = t[warmup_steps - 1], t[len(rows) - 2], len(dts)
    step_s = (hi - lo) / n
    held = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in judge_calls)
    tree_cpu = cpu_in(cpu_samples or [], lo, hi)
    machine_cpu = cpu_in(machine_samples or [], lo, hi)
    last = rows[-1]
    return {
        "steps_per_min": 60.0 / step_s,
        "step_s": step_s,
        "step_s_median": statistics.median(dts),
        "busy_s_per_step": busy,
        "busy_sum_over_step": sum(busy.values()) / step_s,
        "judge_busy_s_per_step": statistics.median(per_step["judge"]),
        # slot-seconds / concurrency: the judge's time per step if its slots were always full
        "judge_work_s_per_step": held / judge_concurrency / n,
        "judge_calls_per_step": sum(calls) / n,
        "cpu_s_per_step": tree_cpu / n,
        # every process's, the run's included: on a shared machine the others take cores the run cannot use
        "machine_cpu_s_per_step": machine_cpu / n,
        # the learner trains, then pushes: one after the other, whatever overlaps around it
        "learner_s_per_step": sum(per_step["learner"]) / n,
        "judge_calls": sum(calls),
        "measured_steps": len(dts),
        "groups_dropped_stale": int(last.get("groups_dropped_stale") or 0),
        "max_staleness_seen": max_staleness_seen(rows),
        "groups_observed": len(records),
    }
