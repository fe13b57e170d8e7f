"""`longtrace bench async`: the same system synchronous (`max_staleness = 0`) and asynchronous (`max_staleness = 2`).

    judge stub (experiments/judge_stub.py: 1 s per call, N calls at once, asyncio sleep = I/O like a remote LLM)
    run "sync":  longtrace up  [prepare] -> phase sft (warm start) -> phase rl, max_staleness 0
    run "async": longtrace up  model = the warm start's export  ->   phase rl, max_staleness 2
    while each runs, a thread copies every ScoredGroup off the `scored` stream (XRANGE: reads, never consumes)

Both RL phases start from the same weights and train the same number of steps on the same data order. The warm
start exists because the judge only sees well-formed answers (a random tiny model writes none); `model_path`
and `dataset_path` skip it.

This module runs both against one judge stub and writes the result (what --json prints). The config and each
run's UpConfig are in experiments/bench_async_plan.py; experiments/bench_async_measure.py says how each stage's
busy time per learner step is measured; experiments/bench_async_summary.py combines the two runs:
ideal_speedup = the sync step / the async run's busiest resource per step (judge, CPU, learner): a bound on the
speedup; ratio = speedup / ideal_speedup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.progress import bar
from experiments.bench_async_measure import CpuSampler, ScoredObserver, summarize_run
from experiments.bench_async_plan import DEFAULT_CONFIG, ROOT, BenchAsyncConfig, BenchError, RunPlan
from experiments.bench_async_summary import combine, rounded

__all__ = ["DEFAULT_CONFIG", "BenchAsyncConfig", "BenchError", "run_bench"]


def _run_up(up_cfg: Any, path: Path, log_path: Path, timeout_s: float) -> CpuSampler:
    """`longtrace up` on the written config, as a child in this process group (Ctrl-C reaches it too); returns the
    CPU samples of its process tree and of the machine."""
    from deploy.launcher.tomlfile import write_config

    write_config(up_cfg, path)
    argv = [sys.executable, "-m", "deploy.cli", "up", str(path), "--no-dashboard"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with log_path.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        cpu = CpuSampler(proc.pid).start()
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
        finally:
            cpu.stop()
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise BenchError(f"longtrace up exited with {code} (log: {log_path}):\n{tail}")
    return cpu


class _StepBar:
    """A progress bar over the learner steps of one `longtrace up` run (every phase's): a thread counts the lines
    of the phases' metrics.jsonl (one per step, common.progress's bar on stderr) every `poll_s`. It reads files
    the run writes anyway; when the bar is off (stderr is not a terminal) no thread runs."""

    def __init__(self, files: list[Path], total: int, desc: str, poll_s: float = 1.0) -> None:
        self.files, self.poll_s = files, poll_s
        self.bar = bar(total, desc, "step")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _StepBar:
        if not self.bar.disable:
            self._thread = threading.Thread(target=self._run, name="bench-async-steps", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.bar.close()

    def steps(self) -> int:
        done = 0
        for path in self.files:
            try:
                done += path.read_bytes().count(b"\n")
            except OSError:  # not written yet
                pass
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            done = min(self.steps(), self.bar.total)
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)


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
            phases = {name: phase.steps for name, phase in up_cfg.phases.items()}  # the sync run: sft, then rl
            files = [RunDir.at(root / mode).metrics_file(name) for name in phases]
            try:
                with _StepBar(files, sum(phases.values()), f"bench async: {mode} ({'+'.join(phases)})"):
                    cpu = _run_up(up_cfg, root / f"{mode}.toml", root / f"{mode}.log", cfg.run_timeout_s)
            finally:
                observer.stop()
            metrics = RunDir.at(root / mode).metrics("rl")
            calls = [(c.start_s, c.end_s) for c in stub.snapshot()]
            _write_jsonl(root / f"{mode}-scored.jsonl", [dataclasses.asdict(r) for r in observer.records])
            summaries[mode] = summarize_run(
                metrics, observer.records, calls, cfg.warmup_steps, cfg.judge.concurrency, cpu.samples, cpu.machine
            )
            summaries[mode]["run_dir"] = str(root / mode)
            note(f"{mode}: {summaries[mode]['steps_per_min']:.2f} steps/min")
    result = combine(summaries["sync"], summaries["async"], len(os.sched_getaffinity(0)))
    up = plan.up_config("sync", 0, cfg.model_path)
    train = up.train_config("redis://127.0.0.1:1/0", "rl", "model", "data.jsonl", "phase")
    result |= {
        "sync": rounded(summaries["sync"]),
        "async": rounded(summaries["async"]),
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
