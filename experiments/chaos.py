"""`longtrace bench chaos`: kill -9 each kind of process of a running `longtrace up`, restart it, and check that
no trajectory group was lost or trained twice.

One `longtrace up` run (usually one RL phase) under the launcher's supervisor. Once the learner has made
`warmup_steps` steps, the faults of `ChaosConfig.faults` are injected in turn, each `steps_between_faults`
learner steps after the previous one recovered:

    reward_worker   SIGKILL, respawn (same consumer name: it resumes its own pending `rollouts` entries)
    rollout_worker  SIGKILL, respawn (same worker id: it resumes its own pending `tasks` entries)
    engine          SIGKILL, respawn on a new port from the newest HF export at that export's version
                    (catches up to the newest weights before it registers); the learner's next push
                    rebuilds its weight group with the new engine
    learner         SIGKILL torchrun and its ranks (after a step that is not a checkpoint step, so steps are
                    retrained), respawn torchrun: it resumes from its last checkpoint
    redis           SIGKILL redis-server, respawn it on the same port and directory: it reloads its
                    append-only file (`--appendfsync always` on its command line, so no acknowledged
                    write is lost, from the first write on and after the restart)

recovery_s of a fault: from the kill until the stage it hit makes progress again (the first new scored group
for the reward worker, rollout group for the rollout worker, rollout group and the respawned engine serving
the current policy version for the engine, logged learner step for the learner and Redis).

At the end (Redis still up) the accounting reads the streams, the dedup keys (every task the feeder ever
admitted, every group published to `rollouts` and `scored`) and the learner state of the final checkpoint:

    groups_admitted     distinct group ids the feeder published to `tasks`
    groups_trained      groups trained in the final checkpoint's lineage (steps retrained after a learner kill
                        count once: the state restored from the checkpoint forgot the lost steps)
    groups_lost         admitted, but neither consumed by the learner of the final lineage (trained or counted
                        as dropped) nor still pending in a stream
    groups_duplicated   group ids the final lineage consumed twice, plus trained + dropped counts beyond the
                        distinct ids it consumed (a group trained in two steps)

and checks that no stream holds an entry, no consumer holds a pending one, and the learner finished its steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from pydantic import Field, model_validator

from broker.base import EngineInfo
from broker.embedded import AppendFsync
from common.config import BaseConfig
from deploy.launcher.config import UpConfig

log = logging.getLogger(__name__)

Fault = Literal["reward_worker", "rollout_worker", "engine", "learner", "redis"]
ALL_FAULTS: tuple[Fault, ...] = ("reward_worker", "rollout_worker", "engine", "learner", "redis")


class ChaosFailed(RuntimeError):
    """A fault was not recovered from in time, or could not be injected."""


class ChaosConfig(BaseConfig):
    faults: list[Fault] = Field(default_factory=lambda: list(ALL_FAULTS))
    """Faults injected in this order, one at a time (each at most once)."""
    phase: str = ""
    """The phase the faults hit; empty: the last phase of `up` (it must be an RL phase)."""
    warmup_steps: int = Field(1, ge=1)
    """Learner steps before the first fault (engines, workers and the learner are all warm)."""
    steps_between_faults: int = Field(1, ge=1)
    """Learner steps after a recovery before the next fault."""
    recovery_timeout_s: float = Field(300.0, gt=0)
    """A fault the system has not recovered from this long after the kill fails the bench."""
    appendfsync: AppendFsync = "always"
    """AOF fsync policy of the embedded Redis (the run's `up.redis.appendfsync`, given at its start). everysec
    loses up to a second of acknowledged writes on a crash (e.g. tasks the learner counts as admitted)."""
    up: UpConfig
    """The system under test: an UpConfig (the same keys as `longtrace up`), as `[up]`, `[up.learner]`, ..."""

    @model_validator(mode="after")
    def _check(self) -> ChaosConfig:
        if len(set(self.faults)) != len(self.faults):
            raise ValueError(f"--faults {self.faults}: a fault is listed twice")
        if not self.faults:
            raise ValueError("--faults: name at least one of " + ", ".join(ALL_FAULTS))
        phase = self.target_phase
        if phase not in self.up.phases:
            raise ValueError(f"--phase {phase!r}: no such phase in up.phases ({', '.join(self.up.phases)})")
        p = self.up.phases[phase]
        if p.kind != "rl":
            raise ValueError(f"--phase {phase!r} is an {p.kind} phase: the faults need the RL loop")
        if p.eval_after or p.eval_before:
            raise ValueError(f"--up.phases.{phase}.eval_before/eval_after: evaluation talks to the engines by their "
                             "start URL, which a respawned engine does not keep; set both false")  # fmt: skip
        needed = self.warmup_steps + len(self.faults) * self.steps_between_faults + 1
        if p.steps < needed:
            raise ValueError(
                f"--up.phases.{phase}.steps {p.steps} < {needed} = warmup_steps + faults x steps_between_faults + 1"
            )
        if "redis" in self.faults and (self.up.redis.url or not self.up.redis.appendonly):
            raise ValueError("the redis fault needs the embedded Redis with its AOF: --up.redis.url '' and "
                             "--up.redis.appendonly true")  # fmt: skip
        redis = self.up.redis
        if "appendfsync" in redis.model_fields_set and redis.appendfsync != self.appendfsync:
            raise ValueError(f"--up.redis.appendfsync {redis.appendfsync} differs from --appendfsync "
                             f"{self.appendfsync}: set the policy once, with --appendfsync")  # fmt: skip
        return self

    def up_config(self) -> UpConfig:
        """The run under test: `up` with the embedded Redis's AOF fsync policy set to `appendfsync`."""
        redis = self.up.redis
        if redis.url or not redis.appendonly:
            return self.up
        return self.up.model_copy(update={"redis": redis.model_copy(update={"appendfsync": self.appendfsync})})

    @property
    def target_phase(self) -> str:
        return self.phase or list(self.up.phases)[-1]


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


class Probe:
    """Cheap reads of one phase's namespace through the broker's read-only view; the reads of the policy version,
    the engines and the dedup keys give None while Redis is down."""

    def __init__(self, redis_url: str, run_id: str) -> None:
        from broker.factory import connect
        from broker.settings import BrokerConfig, BrokerRetryConfig

        # One quick attempt per read: a probe must not stall the launcher's tick while Redis is down.
        self._broker = connect(
            BrokerConfig(
                redis_url=redis_url,
                run_id=run_id,
                socket_timeout_s=2.0,
                connect_timeout_s=1.0,
                retry=BrokerRetryConfig(max_attempts=1, deadline_s=2.0),
            )
        )

    def _try(self, fn: Any) -> Any:
        from broker.base import BrokerError

        try:
            return fn()
        except BrokerError:
            return None

    def published(self, stream: str) -> set[str] | None:
        """Group ids ever published to `stream` (its dedup keys); None while Redis is down."""
        keys: set[str] | None = self._try(self._broker.view(stream).dedup_keys)
        return keys

    def policy_version(self) -> int | None:
        version: int | None = self._try(self._broker.policy_version.get)
        return version

    def engines(self) -> list[EngineInfo] | None:
        """The live engines of the registry, or None."""
        engines: list[EngineInfo] | None = self._try(self._broker.engines.live)
        return engines

    def streams(self) -> dict[str, Any]:
        """Per stream: length, its consumer groups' pending counts, and consumers holding entries."""
        from broker.base import STREAMS

        out: dict[str, Any] = {}
        for stream in STREAMS:
            stats = self._broker.view(stream).stats()
            out[stream] = {
                "length": stats.length,
                "groups": {
                    name: {
                        "pending": g.pending,
                        "holding": {
                            c: {"pending": h.pending, "idle_s": round(h.idle_s, 1)} for c, h in g.holders.items()
                        },
                    }
                    for name, g in stats.groups.items()
                },
            }
        return out

    def entry_group_ids(self) -> set[str]:
        """Group ids of the entries still in `tasks`, `rollouts` and `scored` (undecodable ones left out)."""
        from broker.base import ROLLOUTS, SCORED, TASKS
        from broker.schemas import Group, ScoredGroup, Task

        kinds: dict[str, Any] = {TASKS: Task, ROLLOUTS: Group, SCORED: ScoredGroup}
        ids: set[str] = set()
        for stream, kind in kinds.items():
            view, after = self._broker.view(stream), "0-0"
            while (page := view.peek(kind, after, count=1000)).last_id != after:
                ids.update(e.msg.group_id for e in page.entries)
                after = page.last_id
        return ids

    def close(self) -> None:
        self._broker.close()


class ChaosMonkey:
    """Injects the faults from the launcher's tick (`Launcher.on_tick`) and measures each recovery."""

    def __init__(self, cfg: ChaosConfig, launcher: Any) -> None:
        self.cfg = cfg
        self.launcher = launcher
        self.phase = cfg.target_phase
        self.todo: list[Fault] = list(cfg.faults)
        self.done: list[FaultRecord] = []
        self.current: FaultRecord | None = None
        self._probe: Probe | None = None
        self._steps_at_recovery = 0
        self._baseline: dict[str, Any] = {}
        self._engine_url = ""
        self._child_killed: Any = None

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = Probe(self.launcher.redis_url, self.launcher.cfg.phase_run_id(self.phase))
        return self._probe

    def _steps(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.launcher.run.metrics(self.phase)
        return rows

    def _child(self, name: str) -> Any:
        for child in self.launcher.sup.children:
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
        want = self.cfg.warmup_steps if not self.done else self._steps_at_recovery + self.cfg.steps_between_faults
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
        sup._remember_descendants(child)
        alive = 1 + sum(1 for proc in child.known.values() if _alive(proc))
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

    def _respawn_spec(self, fault: Fault, child: Any) -> Any:
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

    def _engine_spec(self, child: Any) -> Any:
        """The engine's config on a new port, starting from the newest export at its version: it registers
        with the newest weights, and the changed URL makes the learner rebuild its weight group."""
        from common.config import load_config
        from common.net import free_port
        from common.supervisor import HttpReady
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
        if record.respawn_s is None:
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


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def account(cfg: ChaosConfig, launcher: Any, probe: Probe) -> dict[str, Any]:
    """Every admitted group trained once in the final checkpoint's lineage, dropped, or still pending."""
    from broker.base import TASKS
    from learner.checkpoint import STATE_FILE, latest_checkpoint
    from learner.state import LearnerState

    phase = cfg.target_phase
    train = cfg.up.train_config("redis://x", phase, "m", "d", str(launcher.run.phase_dir(phase)))
    ckpt = latest_checkpoint(train.checkpoint_dir)
    if ckpt is None:
        raise ChaosFailed(f"no complete checkpoint in {train.checkpoint_dir}: the learner never finished")
    state = LearnerState.load(ckpt / STATE_FILE)
    admitted = probe.published(TASKS) or set()
    consumed = state.consumed_group_ids
    distinct = set(consumed)
    dropped = state.num_dropped_stale + state.num_dropped_zero_variance + state.num_dead_lettered
    pending_ids = probe.entry_group_ids()
    streams = probe.streams()
    stuck = {
        f"{stream}/{group}/{consumer}": held
        for stream, info in streams.items()
        for group, g in info["groups"].items()
        for consumer, held in g["holding"].items()
    }
    # The launcher samples the namespace once more after the learner exits, before the phase's processes stop.
    last = [x for x in launcher.run.system() if x.get("phase") == phase][-1:] or [{}]
    steps = cfg.up.phases[phase].steps
    return {
        "groups_admitted": len(admitted),
        "groups_trained": state.num_trained_groups,
        "groups_lost": len(admitted - distinct - pending_ids),
        "groups_duplicated": (len(consumed) - len(distinct))
        + max(0, state.num_trained_groups + dropped - len(distinct)),
        "groups_dropped_stale": state.num_dropped_stale,
        "groups_dropped_zero_variance": state.num_dropped_zero_variance,
        "groups_dead_lettered": state.num_dead_lettered,
        "groups_redelivered_skipped": state.num_duplicates,
        "groups_admitted_final_lineage": state.cursor.admitted,
        "groups_expected": steps * train.data.groups_per_step,
        "groups_pending_end": len(pending_ids),
        "entries_left": {s: info["length"] for s, info in streams.items()},
        "consumers_holding_entries": stuck,
        "final_checkpoint_step": state.step,
        # Steps logged twice: trained, lost with a killed learner, trained again after its restart.
        "steps_retrained": len(launcher.run.metrics(phase)) - steps,
        "finished": state.step == steps,
        "policy_version": last[0].get("policy_version"),
        "engine_versions": sorted(last[0].get("engine_versions", [])),
    }


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Run `cfg.up` with the faults injected; return the bench's JSON object (raises nothing the run caused)."""
    from common.config import ConfigError, dump_config
    from common.supervisor import ChildFailed
    from deploy.launcher.dashboard import Dashboard
    from deploy.launcher.rundir import RunDir
    from deploy.launcher.up import Interrupted, Launcher

    run = RunDir.at(cfg.up.run_dir)
    if run.phases_file.exists():
        raise ConfigError(f"--up.run_dir {cfg.up.run_dir} holds a previous run: choose another or remove it")
    run.logs.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run.root / "chaos_config.json")
    file_log = logging.FileHandler(run.logs / "launcher.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    launcher = Launcher(cfg.up_config(), Dashboard(run, "off"))
    monkey = ChaosMonkey(cfg, launcher)
    launcher.on_tick = monkey.tick
    t0 = time.monotonic()
    error = ""
    result: dict[str, Any] = {}

    def interrupt(sig: int, frame: FrameType | None) -> None:
        raise Interrupted(sig)

    # SIGTERM as Ctrl-C: stop every child in order (a bare exit would leave workers retrying a dead Redis).
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.run_all()
        result = account(cfg, launcher, monkey.probe)
        if monkey.current is not None or monkey.todo:
            left = ([monkey.current.fault] if monkey.current else []) + monkey.todo
            raise ChaosFailed(
                f"the learner finished its {cfg.up.phases[cfg.target_phase].steps} steps before faults {left} were "
                f"injected and recovered: raise --up.phases.{cfg.target_phase}.steps"
            )
    except (ChildFailed, ChaosFailed) as e:
        error = str(e)
        log.error("chaos run failed: %s", e)
    except Interrupted as e:
        error = f"interrupted by {e}"
    finally:
        for s in previous:  # a second signal skips the grace periods instead of interrupting the shutdown
            signal.signal(s, lambda *_: launcher.sup.hurry())
        try:
            launcher.sup.stop_all(cfg.up.shutdown_timeout_s)
            launcher.write_processes()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if monkey._probe is not None:
                monkey._probe.close()
            logging.getLogger().removeHandler(file_log)
            file_log.close()
    faults = [r.to_json() for r in monkey.done + ([monkey.current] if monkey.current else [])]
    recovered = all(f["recovery_s"] is not None for f in faults) and len(faults) == len(cfg.faults)
    ok = (
        not error
        and recovered
        and result.get("groups_lost") == 0
        and result.get("groups_duplicated") == 0
        and result.get("groups_pending_end") == 0
        and not result.get("consumers_holding_entries")
        and not any(result.get("entries_left", {}).values())
        and bool(result.get("finished"))
    )
    out = {
        "ok": ok,
        "kills": len(faults),
        **result,
        "recovery_s": {f["fault"]: f["recovery_s"] for f in faults},
        "appendfsync": cfg.appendfsync,
        "faults": faults,
        "seconds": round(time.monotonic() - t0, 1),
        "run_dir": str(run.root),
        "error": error,
    }
    (run.root / "chaos.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def load_chaos_config(path: str | Path, overrides: list[str]) -> ChaosConfig:
    from common.config import load_config

    return load_config(ChaosConfig, path, overrides)
