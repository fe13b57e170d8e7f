"""The live view of `longtrace up`: learner metrics (metrics.jsonl) and Redis state (queue depths, versions).

Two renderings of the same numbers: `live` redraws a plain-ANSI panel in place (a terminal), `lines` prints one
line per learner step (logs, CI, pipes). Every refresh also appends a sample of the queue depths, the policy
version and the engines' weight versions to RUN_DIR/system.jsonl, which `longtrace report` plots.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from broker.base import Producer
from deploy.launcher import rundir as rd
from deploy.launcher.rundir import RunDir

Mode = Literal["live", "lines", "off"]
_CLEAR = "\x1b[H\x1b[2J"
_BOLD, _DIM, _RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"


def resolve_mode(mode: str, out: TextIO) -> Mode:
    if mode == "auto":
        return "live" if out.isatty() else "lines"
    assert mode in ("live", "lines", "off"), mode
    return mode  # type: ignore[return-value]


class SystemSampler:
    """Reads one phase's namespace in Redis: stream backlogs, policy version, live engines."""

    def __init__(self, redis_url: str, run_id: str) -> None:
        from broker.base import DEAD, ROLLOUTS, SCORED, TASKS
        from broker.factory import connect
        from broker.schemas import DeadLetter, Group, ScoredGroup, Task
        from broker.settings import BrokerConfig, BrokerRetryConfig

        retry = BrokerRetryConfig(max_attempts=2, deadline_s=5.0)
        cfg = BrokerConfig(redis_url=redis_url, run_id=run_id, socket_timeout_s=2.0, retry=retry)
        self.broker = connect(cfg)
        self.producers: dict[str, Producer[Any]] = {
            "tasks": self.broker.producer(TASKS, Task),
            "rollouts": self.broker.producer(ROLLOUTS, Group),
            "scored": self.broker.producer(SCORED, ScoredGroup),
            "dead": self.broker.producer(DEAD, DeadLetter),
        }

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: p.backlog() for name, p in self.producers.items()}
        out["policy_version"] = self.broker.policy_version.get()
        engines = self.broker.engines.live()
        out["num_engines"] = len(engines)
        out["engine_versions"] = [e.policy_version for e in engines]
        return out

    def close(self) -> None:
        self.broker.close()


@dataclass
class PhaseView:
    name: str
    kind: str
    index: int
    num_phases: int
    steps: int
    started_s: float = field(default_factory=time.time)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_duration(seconds: float) -> str:
    if math.isnan(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def rates(steps: Sequence[dict[str, Any]], window: int = 10) -> dict[str, float]:
    """Steps per minute, samples per second and seconds per step over the last `window` steps."""
    recent = list(steps[-(window + 1) :])
    if len(recent) < 2:
        return {"steps_per_min": math.nan, "samples_per_s": math.nan, "s_per_step": math.nan}
    dt = recent[-1][rd.TIME] - recent[0][rd.TIME]
    n = len(recent) - 1
    samples = sum(float(m.get(rd.NUM_SAMPLES) or 0) for m in recent[1:])
    if dt <= 0:
        return {"steps_per_min": math.nan, "samples_per_s": math.nan, "s_per_step": math.nan}
    return {"steps_per_min": 60 * n / dt, "samples_per_s": samples / dt, "s_per_step": dt / n}


class Dashboard:
    """Call `start_phase` when a phase starts and `update` every refresh; `note` shows a launcher message."""

    def __init__(self, run: RunDir, mode: Mode, out: TextIO | None = None) -> None:
        self.run = run
        self.mode = mode
        self.out = out or sys.stdout
        self.phase: PhaseView | None = None
        self.sampler: SystemSampler | None = None
        self.steps: list[dict[str, Any]] = []
        self.system: dict[str, Any] = {}
        self.notes: list[str] = []
        self._printed_step = 0
        self._started = time.time()

    def start_phase(self, phase: PhaseView, sampler: SystemSampler | None) -> None:
        self.end_phase()
        self.phase, self.sampler = phase, sampler
        self.steps, self.system, self._printed_step = [], {}, 0
        self.note(f"phase {phase.index + 1}/{phase.num_phases} {phase.name!r} ({phase.kind}, {phase.steps} steps)")

    def end_phase(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        self.sampler = None

    def note(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        self.notes = [*self.notes, line][-6:]
        if self.mode == "lines":
            print(line, file=self.out, flush=True)
        elif self.mode == "live":
            self._redraw()

    def update(self) -> None:
        if self.phase is None:
            return
        self.steps = self.run.metrics(self.phase.name)
        if self.sampler is not None:
            self.system = self.sampler.sample()
            sample = {"time_s": round(time.time(), 3), "phase": self.phase.name, **self.system}
            if self.steps:
                sample["step"] = self.steps[-1][rd.STEP]
            with self.run.system_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(sample) + "\n")
        if self.mode == "live":
            self._redraw()
        elif self.mode == "lines":
            for m in self.steps:
                if m[rd.STEP] > self._printed_step:
                    print(self.step_line(m), file=self.out, flush=True)
                    self._printed_step = m[rd.STEP]

    # -- rendering

    def eta_s(self) -> float:
        assert self.phase is not None
        r = rates(self.steps)
        done = self.steps[-1][rd.STEP] if self.steps else 0
        return float((self.phase.steps - done) * r["s_per_step"])

    def _rewards(self, m: dict[str, Any]) -> str:
        """Reward, accuracy and rubric hits of an RL step; nothing for SFT (demonstrations carry a placeholder 1)."""
        if self.phase is None or self.phase.kind != "rl":
            return ""
        return f"reward {_fmt(m.get(rd.REWARD))} acc {_fmt(m.get(rd.ACCURACY))} rubric {_fmt(m.get(rd.RUBRIC_HITS))} "

    def step_line(self, m: dict[str, Any]) -> str:
        assert self.phase is not None
        upto = [s for s in self.steps if s[rd.STEP] <= m[rd.STEP]]
        r = rates(upto)
        q = self.system
        queues = " ".join(f"{k} {q.get(k, '-')}" for k in rd.STREAMS)
        return (
            f"[{self.phase.name}] step {m[rd.STEP]}/{self.phase.steps} v{_fmt(m.get(rd.POLICY_VERSION), 0)} "
            f"loss {_fmt(m.get(rd.LOSS))} {self._rewards(m)}stale {_fmt(rd.mean_staleness(m), 2)} "
            f"dropped {_fmt(m.get(rd.GROUPS_DROPPED_STALE), 0)} | {queues} | "
            f"{_fmt(r['steps_per_min'], 1)} steps/min {_fmt(r['samples_per_s'], 1)} samples/s | "
            f"ETA {fmt_duration(self.eta_s())}"
        )

    def panel(self) -> str:
        lines = [f"{_BOLD}longtrace up{_RESET}  {self.run.root}  running {fmt_duration(time.time() - self._started)}"]
        if self.phase is not None:
            p = self.phase
            last = self.steps[-1] if self.steps else {}
            done = last.get(rd.STEP, 0)
            width = 30
            filled = int(width * done / p.steps) if p.steps else 0
            r = rates(self.steps)
            q = self.system
            lines += [
                f"phase {p.index + 1}/{p.num_phases}: {_BOLD}{p.name}{_RESET} ({p.kind})  "
                f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{p.steps}  ETA {fmt_duration(self.eta_s())}",
                f"policy version  learner {_fmt(last.get(rd.POLICY_VERSION), 0)}  key {q.get('policy_version', '-')}  "
                f"engines {q.get('engine_versions', '-')}",
                f"{self._rewards(last)}loss {_fmt(last.get(rd.LOSS))}",
                "queues  " + "  ".join(f"{k} {q.get(k, '-')}" for k in rd.STREAMS),
                f"staleness {_fmt(rd.mean_staleness(last), 2)}  dropped stale {_fmt(last.get(rd.GROUPS_DROPPED_STALE), 0)}"
                f"  admitted {_fmt(last.get(rd.GROUPS_ADMITTED), 0)}  trained {_fmt(last.get(rd.GROUPS_TRAINED), 0)}",
                f"throughput {_fmt(r['steps_per_min'], 1)} steps/min  {_fmt(r['samples_per_s'], 1)} samples/s  "
                f"{_fmt(last.get(rd.TOKENS_PER_S), 0)} train tokens/s",
            ]
        evals = self.run.evals()
        if evals:
            lines.append(
                "held-out  " + "  ".join(f"{e['phase']}/{e['when']} acc {_fmt(e['accuracy'])}" for e in evals[-4:])
            )
        lines += ["", *(f"{_DIM}{n}{_RESET}" for n in self.notes)]
        return "\n".join(lines)

    def _redraw(self) -> None:
        self.out.write(_CLEAR + self.panel() + "\n")
        self.out.flush()

    def close(self) -> None:
        self.end_phase()
