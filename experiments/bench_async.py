"""`longtrace bench async`: the same system synchronous (`max_staleness = 0`) and asynchronous (`max_staleness = 2`).

    judge stub (experiments/judge_stub.py: 1 s per call, N calls at once, asyncio sleep = I/O like a remote LLM)
    run "sync":  longtrace up  [prepare] -> phase sft (warm start) -> phase rl, max_staleness 0
    run "async": longtrace up  model = the warm start's export  ->   phase rl, max_staleness 2
    while each runs, a thread copies every ScoredGroup off the `scored` stream (XRANGE: reads, never consumes)

Both RL phases start from the same weights and train the same number of steps on the same data order. The warm
start exists because the judge only sees well-formed answers (a random tiny model writes none); `model_path`
and `dataset_path` skip it.

Per-stage busy time is measured per learner step, on the step's window (t[i-1], t[i]] of metrics.jsonl:
- generation: the union of the groups' generation intervals [end - Group.rollout_s, end], where the end is the
  scored entry's XADD time (a ms timestamp) minus ScoredGroup.score_s (the reward worker takes a group as soon
  as it is published: its concurrency exceeds the groups in flight);
- scoring: the union of the groups' scoring intervals [XADD time - score_s, XADD time];
- training: the learner's `step_s` (old logprobs, forward-backward, optimizer step);
- weight sync: the learner's `weight_sync/total_s` (export, pause, broadcast, resume).
The steps measured are warmup_steps + 1 .. steps - 1 (the last one also writes the run's only checkpoint);
every figure is a median over them. steps/min = 60 / median step interval.
ideal_speedup = sum of the sync run's busy medians / their largest: the speedup of a perfect pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from common.config import BaseConfig, ConfigError, get_path, has_path, merge_tables

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "bench" / "async.toml"
STAGES = ("generation", "scoring", "training", "weight_sync")
TARGET_EFFICIENCY = 0.9
_PLACEHOLDER_URL = "http://127.0.0.1:1/v1"

# UpConfig keys of `up` that the bench sets itself (each run's directory, Redis, phases, judge URL, staleness).
BENCH_KEYS = (
    "run_dir",
    "run_id",
    "model_path",
    "redis",
    "phases",
    "dashboard",
    "report",
    "reward.serve",
    "reward.config.judge.base_url",
    "learner.config.data.max_staleness",
)


class JudgeSection(BaseConfig):
    delay_s: float = Field(1.0, ge=0)
    """Seconds each judge call takes (the remote LLM's latency; asyncio sleep, so I/O, no CPU)."""
    concurrency: int = Field(8, ge=1)
    """Judge calls served at once (the remote LLM's capacity); the others queue."""


class WarmStartSection(BaseConfig):
    steps: int = Field(60, ge=1)
    """SFT steps before the RL runs, so that answers are well formed and reach the judge."""
    learner: dict[str, Any] = {}
    """TrainConfig keys of the SFT phase, over `up.learner.config` (e.g. data.groups_per_step, optim.lr)."""


class BenchAsyncConfig(BaseConfig):
    run_dir: str = "runs/bench-async"
    """Parent directory; each bench writes `<run_dir>/<timestamp>/{sync,async}` (two `longtrace up` run dirs)."""
    steps: int = Field(12, ge=3)
    """RL steps of each run."""
    warmup_steps: int = Field(2, ge=1)
    """First steps left out of the medians (start-up, and the async pipeline filling)."""
    async_max_staleness: int = Field(2, ge=1)
    """max_staleness of the async run (the sync run has 0)."""
    judge: JudgeSection = Field(default_factory=JudgeSection)
    """The stand-in remote judge."""
    warm_start: WarmStartSection = Field(default_factory=WarmStartSection)
    """SFT in the sync run's `longtrace up` before its RL phase (skipped when model_path is set)."""
    model_path: str = ""
    """A warm HF model directory (e.g. a demo run's exports/v300); empty: train one with [warm_start]."""
    dataset_path: str = ""
    """The RL prompts (LongTraceRL JSONL), required with model_path; empty: the data [up.prepare] writes."""
    poll_s: float = Field(0.25, gt=0)
    """Period of the reads of the `scored` stream (entries stay there until the learner's final checkpoint)."""
    run_timeout_s: float = Field(900.0, gt=0)
    """A `longtrace up` run that takes longer is interrupted and the bench fails."""
    up: dict[str, Any] = {}
    """UpConfig keys shared by both runs (prepare, reward, engines, rollout, learner); not those in BENCH_KEYS."""

    @model_validator(mode="after")
    def _check(self) -> BenchAsyncConfig:
        if self.warmup_steps >= self.steps - 1:
            raise ValueError(f"--warmup_steps {self.warmup_steps} leaves no measured step of --steps {self.steps}")
        for key in BENCH_KEYS:
            if has_path(self.up, key):
                raise ValueError(f"--up.{key} is set by the bench (experiments/bench_async.py); remove it")
        judge = get_path(self.up, "reward.config.judge.kind", "rule")
        if judge != "llm":
            raise ValueError(f"--up.reward.config.judge.kind must be llm (the stub judge), got {judge!r}")
        if bool(self.model_path) != bool(self.dataset_path):
            raise ValueError("--model_path and --dataset_path go together (a warm model and its prompts)")
        if not self.model_path and "prepare" not in self.up:
            raise ValueError("--up.prepare is required unless --model_path and --dataset_path are given")
        # Both runs' UpConfigs are built here with placeholders, so a bad key fails at load time.
        plan = RunPlan(self, Path("bench"), _PLACEHOLDER_URL)
        for mode in ("sync", "async"):
            plan.up_config(mode, redis_port=0, warm_model=self.model_path or "warm-model")
        return self


class BenchError(RuntimeError):
    """A run failed or produced too little to measure (the message says which and where its log is)."""


# ---------------------------------------------------------------- the two `longtrace up` configs


class RunPlan:
    """The UpConfig of each run: the shared `up` keys plus what the bench sets."""

    def __init__(self, cfg: BenchAsyncConfig, root: Path, judge_url: str) -> None:
        self.cfg = cfg
        self.root = root
        self.judge_url = judge_url

    def run_dir(self, mode: str) -> Path:
        return self.root / mode

    def warm_model(self) -> str:
        """The model both RL phases start from (the warm start's last export when the bench trains it)."""
        if self.cfg.model_path:
            return self.cfg.model_path
        from weights.exports import latest_export

        found = latest_export(self.run_dir("sync") / "phases" / "sft" / "exports")
        if found is None:
            raise BenchError(f"the warm start left no export in {self.run_dir('sync')}/phases/sft/exports")
        return str(found[0])

    def up_config(self, mode: str, redis_port: int, warm_model: str) -> Any:
        from deploy.launcher.config import UpConfig

        cfg = self.cfg
        staleness = 0 if mode == "sync" else cfg.async_max_staleness
        rl: dict[str, Any] = {
            "kind": "rl",
            "steps": cfg.steps,
            "eval_after": False,
            # One checkpoint, after the last step: scored entries stay in the stream (and in reach of the
            # observer) until then, and no step but the last pays for a checkpoint.
            "learner": {"data": {"max_staleness": staleness}, "checkpoint": {"interval_steps": cfg.steps}},
        }
        up = dict(cfg.up)
        phases: dict[str, Any] = {}
        if mode == "sync" and not cfg.model_path:
            sft_learner = {"checkpoint": {"interval_steps": cfg.warm_start.steps}}
            phases["sft"] = {
                "kind": "sft",
                "steps": cfg.warm_start.steps,
                "init": "base",
                "eval_after": False,
                "learner": merge_tables(sft_learner, cfg.warm_start.learner),
            }
            rl["init"] = "previous"
        else:
            up.pop("prepare", None)
            up["model_path"] = warm_model
            rl["init"] = "base"
            rl["dataset_path"] = cfg.dataset_path or str(self.run_dir("sync") / "data" / "train.jsonl")
        phases["rl"] = rl
        data = merge_tables(
            up,
            {
                "run_dir": str(self.run_dir(mode)),
                "run_id": f"bench-{mode}",
                "redis": {"port": redis_port},
                "reward": {"serve": False, "config": {"judge": {"base_url": self.judge_url}}},
                "phases": phases,
                "dashboard": {"mode": "lines"},
                "report": False,
            },
        )
        try:
            return UpConfig.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                (f"{'.'.join(str(x) for x in err['loc'])}: " if err["loc"] else "")
                + str(err["msg"]).removeprefix("Value error, ")
                for err in e.errors(include_url=False)
            )
            raise ValueError(f"the {mode} run's UpConfig (flags below are under --up.): {problems}") from None


# ---------------------------------------------------------------- watching the `scored` stream


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
        self._thread = threading.Thread(target=self._run, name=f"observer-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        from broker.base import SCORED, Broker, BrokerError
        from broker.factory import connect
        from broker.schemas import ScoredGroup
        from broker.settings import BrokerConfig, BrokerRetryConfig

        cfg = BrokerConfig(
            redis_url=self.redis_url,
            run_id=self.run_id,
            socket_timeout_s=2.0,
            connect_timeout_s=2.0,
            retry=BrokerRetryConfig(max_attempts=1, deadline_s=2.0),
        )
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


# ---------------------------------------------------------------- measuring


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
) -> dict[str, Any]:
    """Medians over the measured steps of one run (see the module docstring)."""
    rows = sorted(metrics, key=lambda m: m["step"])
    steps = [m["step"] for m in rows]
    if steps != list(range(1, len(rows) + 1)) or len(rows) < warmup_steps + 2:
        raise BenchError(f"metrics cover steps {steps[:3]}...{steps[-3:]}: too few to measure after warm-up")
    t = [float(m["time_s"]) for m in rows]
    gen = [r.generation for r in records]
    score = [r.scoring for r in records]
    per_step: dict[str, list[float]] = {s: [] for s in (*STAGES, "judge", "judge_work")}
    dts, calls = [], []
    for i in range(warmup_steps, len(rows) - 1):  # index i is step i + 1; the last step (checkpoint) left out
        lo, hi = t[i - 1], t[i]
        dts.append(hi - lo)
        per_step["generation"].append(union_length(gen, lo, hi))
        per_step["scoring"].append(union_length(score, lo, hi))
        per_step["training"].append(float(rows[i]["step_s"]))
        per_step["weight_sync"].append(float(rows[i].get("weight_sync/total_s") or 0.0))
        per_step["judge"].append(union_length(judge_calls, lo, hi))
        held = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in judge_calls)
        per_step["judge_work"].append(held / judge_concurrency)
        calls.append(sum(lo < end <= hi for _, end in judge_calls))
    busy = {s: statistics.median(v) for s, v in per_step.items() if s in STAGES}
    step_s = statistics.median(dts)
    last = rows[-1]
    return {
        "steps_per_min": 60.0 / step_s,
        "step_s": step_s,
        "busy_s_per_step": busy,
        "busy_sum_over_step": sum(busy.values()) / step_s,
        "judge_busy_s_per_step": statistics.median(per_step["judge"]),
        # slot-seconds / concurrency: the judge's time per step if its slots were always full
        "judge_work_s_per_step": statistics.median(per_step["judge_work"]),
        "judge_calls_per_step": statistics.median(calls),
        "judge_calls": sum(calls),
        "measured_steps": len(dts),
        "groups_dropped_stale": int(last.get("groups_dropped_stale") or 0),
        "max_staleness_seen": max_staleness_seen(rows),
        "groups_observed": len(records),
    }


def combine(sync: dict[str, Any], asyn: dict[str, Any]) -> dict[str, Any]:
    busy = sync["busy_s_per_step"]
    ideal = sum(busy.values()) / max(busy.values()) if max(busy.values()) > 0 else math.nan
    speedup = asyn["steps_per_min"] / sync["steps_per_min"]
    return {
        "sync_steps_per_min": round(sync["steps_per_min"], 3),
        "async_steps_per_min": round(asyn["steps_per_min"], 3),
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "efficiency": round(speedup / ideal, 3),
        "target_efficiency": TARGET_EFFICIENCY,
    }


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


# ---------------------------------------------------------------- running


def _run_up(up_cfg: Any, path: Path, log_path: Path, timeout_s: float) -> None:
    """`longtrace up` on the written config, as a child in this process group (Ctrl-C reaches it too)."""
    from deploy.launcher.tomlfile import write_config

    write_config(up_cfg, path)
    argv = [sys.executable, "-m", "deploy.cli", "up", str(path), "--no-dashboard"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with log_path.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(2)  # SIGINT: the launcher stops its processes in order
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            raise BenchError(
                f"longtrace up ran longer than --run_timeout_s {timeout_s:.0f}s (log: {log_path})"
            ) from None
        except BaseException:
            proc.wait(timeout=120)  # Ctrl-C reached the launcher as well: let it shut down in order
            raise
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise BenchError(f"longtrace up exited with {code} (log: {log_path}):\n{tail}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_bench(cfg: BenchAsyncConfig, progress: Any = None) -> dict[str, Any]:
    """Both runs against one judge stub; the result dict (what `--json` prints)."""
    from common.net import free_port
    from deploy.launcher.rundir import RunDir
    from experiments.judge_stub import JudgeStub, JudgeStubConfig

    def note(text: str) -> None:
        if progress is not None:
            print(f"{time.strftime('%H:%M:%S')} bench async: {text}", file=progress, flush=True)

    started = time.time()
    root = Path(cfg.run_dir) / time.strftime("%Y%m%d-%H%M%S")
    if root.exists():
        raise ConfigError(f"--run_dir: {root} exists already")
    root.mkdir(parents=True)
    stub = JudgeStub(JudgeStubConfig(delay_s=cfg.judge.delay_s, concurrency=cfg.judge.concurrency))
    summaries: dict[str, dict[str, Any]] = {}
    with stub.serve() as server:
        plan = RunPlan(cfg, root, f"{server.url}/v1")
        for mode in ("sync", "async"):
            port = free_port()
            warm = plan.warm_model() if mode == "async" or cfg.model_path else ""
            up_cfg = plan.up_config(mode, port, warm)
            run_id = up_cfg.phase_run_id("rl")
            observer = ScoredObserver(f"redis://127.0.0.1:{port}/0", run_id, cfg.poll_s).start()
            note(f"{mode} run (max_staleness {0 if mode == 'sync' else cfg.async_max_staleness}) in {root / mode}")
            try:
                _run_up(up_cfg, root / f"{mode}.toml", root / f"{mode}.log", cfg.run_timeout_s)
            finally:
                observer.stop()
            metrics = RunDir.at(root / mode).metrics("rl")
            calls = [(c.start_s, c.end_s) for c in stub.snapshot()]
            _write_jsonl(root / f"{mode}-scored.jsonl", [dataclasses.asdict(r) for r in observer.records])
            summaries[mode] = summarize_run(metrics, observer.records, calls, cfg.warmup_steps, cfg.judge.concurrency)
            summaries[mode]["run_dir"] = str(root / mode)
            note(f"{mode}: {summaries[mode]['steps_per_min']:.2f} steps/min")
    result = combine(summaries["sync"], summaries["async"])
    up = plan.up_config("sync", 0, cfg.model_path)
    train = up.train_config("redis://127.0.0.1:1/0", "rl", "model", "data.jsonl", "phase")
    result |= {
        "sync": _rounded(summaries["sync"]),
        "async": _rounded(summaries["async"]),
        "config": {
            "steps": cfg.steps,
            "warmup_steps": cfg.warmup_steps,
            "async_max_staleness": cfg.async_max_staleness,
            "groups_per_step": train.data.groups_per_step,
            "num_samples": train.data.num_samples,
            "judge_delay_s": cfg.judge.delay_s,
            "judge_concurrency": cfg.judge.concurrency,
            "num_engines": up.engines.num_engines,
            "learner_ranks": up.learner.nproc_per_node,
            "warm_start_steps": 0 if cfg.model_path else cfg.warm_start.steps,
            "cpus": os.cpu_count(),
        },
        "wall_s": round(time.time() - started, 1),
    }
    _write_jsonl(root / "judge-calls.jsonl", [dataclasses.asdict(c) for c in stub.snapshot()])
    (root / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The short human-readable view of a result."""
    lines = [f"{'':14}{'steps/min':>10}{'step s':>8}" + "".join(f"{s:>12}" for s in STAGES) + f"{'stale drop':>11}"]
    for mode in ("sync", "async"):
        r = result[mode]
        busy = r["busy_s_per_step"]
        lines.append(
            f"{mode:14}{r['steps_per_min']:>10.2f}{r['step_s']:>8.2f}"
            + "".join(f"{busy[s]:>12.2f}" for s in STAGES)
            + f"{r['groups_dropped_stale']:>11}"
        )
    lines.append(
        f"speedup {result['speedup']:.2f}  ideal {result['ideal_speedup']:.2f}  efficiency {result['efficiency']:.2f} "
        f"(target >= {TARGET_EFFICIENCY})   busy s/step of each stage are medians; the async run's stages overlap"
    )
    return "\n".join(lines)
