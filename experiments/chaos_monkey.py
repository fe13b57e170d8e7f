"""The chaos bench's driver: `ChaosMonkey` injects the faults from the launcher's tick (SIGKILL of a process and its
descendants through the supervisor, respawn with the spec the fault needs) and measures each recovery into a
`FaultRecord`. experiments/chaos.py runs it inside `longtrace up` and describes the faults and the recovery times.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from common.supervisor import Child, HttpReady, ProcessSpec
from experiments.chaos_config import ChaosConfig, ChaosFailed, Fault
from experiments.chaos_probe import Probe, ProbeHandle

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FaultRecord:
    fault: Fault
    process: str
    processes_killed: int
    step_at_kill: int
    killed_s: float  # monotonic
    respawn_s: float | None = None  # until the respawned process is ready again
    recovery_s: float | None = None
    caught_up_s: float | None = None  # engine: until the respawned engine serves the current policy version

    def to_json(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "process": self.process,
            "kills": 1,
            "processes_killed": self.processes_killed,
            "step_at_kill": self.step_at_kill,
            "respawn_s": _round(self.respawn_s),
            "recovery_s": _round(self.recovery_s),
            **({"caught_up_s": _round(self.caught_up_s)} if self.fault == "engine" else {}),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


class ChaosMonkey:
    """Injects the faults from the launcher's tick (`Launcher.on_tick`) and measures each recovery."""

    def __init__(
        self,
        cfg: ChaosConfig,
        launcher: Any,
        probes: ProbeHandle,
        faults: list[Fault] | None = None,
        warmup_steps: int | None = None,
        steps_between: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.launcher = launcher
        self.phase = cfg.target_phase
        self.todo: list[Fault] = list(cfg.faults if faults is None else faults)
        self.num_faults = len(self.todo)
        self._warmup_steps = cfg.warmup_steps if warmup_steps is None else warmup_steps
        self._steps_between = cfg.steps_between_faults if steps_between is None else steps_between
        self.done: list[FaultRecord] = []
        self.current: FaultRecord | None = None
        self._probes = probes
        self._steps_at_recovery = 0
        self._baseline: dict[str, Any] = {}
        self._engine_url = ""
        self._child_killed: Child | None = None

    @property
    def probe(self) -> Probe:
        return self._probes.get()

    def _steps(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.launcher.run.metrics(self.phase)
        return rows

    def _child(self, name: str) -> Child:
        children: list[Child] = self.launcher.sup.children
        for child in children:
            if child.name == name:
                return child
        raise ChaosFailed(f"no process named {name!r} to kill (is phase {self.phase!r} running?)")

    def tick(self) -> None:
        if self.launcher.dashboard.phase is None or self.launcher.dashboard.phase.name != self.phase:
            return  # another phase (e.g. the SFT warm start) runs
        if self.current is not None:
            self._watch(self.current)
        elif self.todo and self._warm():
            self._inject(self.todo.pop(0))

    def _warm(self) -> bool:
        steps = self._steps()
        want = self._warmup_steps if not self.done else self._steps_at_recovery + self._steps_between
        if len(steps) < want:
            return False
        if self.todo[0] == "learner":
            # Kill after a step the last checkpoint does not include, so the restart retrains steps.
            interval = int(
                self.launcher.cfg.train_config("redis://x", self.phase, "m", "d", "p").checkpoint.interval_steps
            )
            return int(steps[-1]["step"]) % interval != 0
        return True

    def _counts(self) -> dict[str, Any]:
        from broker.base import ROLLOUTS, SCORED

        rollouts, scored = self.probe.published(ROLLOUTS), self.probe.published(SCORED)
        return {
            "rollouts": None if rollouts is None else len(rollouts),
            "scored": None if scored is None else len(scored),
            "steps": len(self._steps()),
        }

    def _inject(self, fault: Fault) -> None:
        p = self.phase
        name = {
            "reward_worker": f"{p}-reward-worker-0",
            "rollout_worker": f"{p}-rollout-0",
            "engine": f"{p}-engine-0",
            "learner": f"{p}-learner",
            "redis": "redis",
        }[fault]
        child = self._child(name)
        sup = self.launcher.sup
        self._baseline = self._counts()
        steps = self._steps()
        alive = 1 + len(child.living_descendants())
        t0 = time.monotonic()
        sup.kill(child)
        record = FaultRecord(fault, name, alive, int(steps[-1]["step"]) if steps else 0, t0)
        log.warning("chaos: killed %s (%d processes) at step %d", name, alive, record.step_at_kill)
        # Only Redis is waited for here (nothing moves without it); the others start while the ticks go on
        # watching the system, so the recovery of the stage is not hidden behind the process's start-up.
        sup.respawn(child, self._respawn_spec(fault, child), wait_ready=fault == "redis")
        if fault == "redis":
            record.respawn_s = time.monotonic() - t0
        self._child_killed = child
        self.current = record

    def _respawn_spec(self, fault: Fault, child: Child) -> ProcessSpec:
        from common.net import free_port

        spec = child.spec
        if fault == "learner":
            # A fresh rendezvous port: the killed agent's may linger in TIME_WAIT.
            argv = list(spec.argv)
            argv[argv.index("--master_port") + 1] = str(free_port())
            return dataclasses.replace(spec, argv=argv)
        if fault == "engine":
            return self._engine_spec(child)
        return spec

    def _engine_spec(self, child: Child) -> ProcessSpec:
        """The engine's config on a new port, starting from the newest export at its version: it registers
        with the newest weights, and the changed URL makes the learner rebuild its weight group."""
        from common.config import load_config
        from common.net import free_port
        from deploy.launcher.tomlfile import write_config
        from rollout_server.engine.config import EngineConfig

        argv = list(child.spec.argv)
        old = load_config(EngineConfig, argv[argv.index("--config") + 1])
        port = free_port()
        update: dict[str, Any] = {"port": port}
        dest = self.launcher.run.root / "chaos" / f"{child.name}-restart{child.restarts + 1}"
        found = _copy_latest_export(self.launcher.run.phase_dir(self.phase) / "exports", dest)
        if found is not None:
            update |= {"model_path": str(found[0]), "weight_version": str(found[1])}
        new = EngineConfig.model_validate(old.model_dump() | update)
        path = write_config(new, self.launcher.run.configs / f"{child.name}-restart{child.restarts + 1}.toml")
        argv[argv.index("--config") + 1] = str(path)
        self._engine_url = f"http://127.0.0.1:{port}"
        return dataclasses.replace(child.spec, argv=argv, ready=HttpReady(f"{self._engine_url}/health"))

    def _watch(self, record: FaultRecord) -> None:
        now = self._counts()
        base = self._baseline
        elapsed = time.monotonic() - record.killed_s
        if record.recovery_s is None:
            stage = {"reward_worker": "scored", "rollout_worker": "rollouts", "engine": "rollouts"}.get(record.fault)
            # learner, redis: the end of the pipeline moves again (a logged learner step)
            moved = _advanced(now, base, stage) if stage else now["steps"] > base["steps"]
            record.recovery_s = elapsed if moved else None
        if record.respawn_s is None and self._child_killed is not None:
            ready = self._child_killed.spec.ready
            record.respawn_s = elapsed if ready is None or ready.probe(self._child_killed) else None
        if record.fault == "engine" and record.caught_up_s is None and self._engine_caught_up():
            record.caught_up_s = elapsed
        back = record.respawn_s is not None and (record.fault != "engine" or record.caught_up_s is not None)
        if record.recovery_s is not None and back:
            log.warning("chaos: %s recovered in %.1fs", record.fault, record.recovery_s)
            self.done.append(record)
            self.current = None
            self._steps_at_recovery = now["steps"]
        elif elapsed > self.cfg.recovery_timeout_s:
            self.done.append(record)
            self.current = None
            raise ChaosFailed(f"{record.fault}: not recovered {self.cfg.recovery_timeout_s:.0f}s after the kill")

    def _engine_caught_up(self) -> bool:
        version, engines = self.probe.policy_version(), self.probe.engines()
        if version is None or engines is None:
            return False
        mine = [e for e in engines if e.url.rstrip("/") == self._engine_url]
        return bool(mine) and mine[0].policy_version >= version


def _copy_latest_export(export_dir: Path, dest: Path, attempts: int = 5) -> tuple[Path, int] | None:
    """Copy the newest export to `dest` and return (dest, version); None when there is none yet.

    The learner prunes all but its newest `export_keep_last` exports at every push, so an engine started from
    the export directory itself may find it deleted under it: it starts from a private copy. A copy that raced
    with the pruning (files vanished) is retried with the then newest export."""
    import shutil

    from weights.exports import latest_export

    for _ in range(attempts):
        found = latest_export(export_dir)
        if found is None:
            return None
        src, version = found
        shutil.rmtree(dest, ignore_errors=True)
        try:
            names = sorted(p.name for p in src.iterdir())
            shutil.copytree(src, dest)
        except OSError:
            continue
        if src.is_dir() and sorted(p.name for p in dest.iterdir()) == names:
            return dest, version
    raise ChaosFailed(f"could not copy an export out of {export_dir} in {attempts} attempts (pruned while copying)")


def _advanced(now: dict[str, Any], base: dict[str, Any], key: str) -> bool:
    return now[key] is not None and base[key] is not None and now[key] > base[key]
