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

This module runs the bench and writes its JSON; experiments/chaos_config.py holds the config and its checks,
experiments/chaos_monkey.py injects the faults and times the recoveries, experiments/chaos_probe.py reads the
queue and does the accounting.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from types import FrameType
from typing import Any

from experiments.chaos_config import ChaosConfig, ChaosFailed, load_chaos_config
from experiments.chaos_monkey import ChaosMonkey
from experiments.chaos_probe import account

__all__ = ["ChaosConfig", "ChaosFailed", "load_chaos_config", "run_chaos"]

log = logging.getLogger(__name__)


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
            monkey.close()
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
