"""`longtrace bench chaos`: run the local system through the faults a real run meets (experiments/chaos_scenarios.py:
kill -9 of each process kind, a judge outage, generations longer than a task's lease, oversized output, tasks the
engines reject, a learner crash loop, a regex bomb through the public API) and account for every admitted group.

Each scenario is one `longtrace up` run (usually one RL phase) of the base `[up]` under the launcher's supervisor,
in `up.run_dir/<scenario>`, with the overrides the scenario needs. The `kills` scenario injects, once the learner
has made `warmup_steps` steps, the faults of `ChaosConfig.faults` in turn, each `steps_between_faults` learner
steps after the previous one recovered:

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

At the end of each run (Redis still up) experiments/chaos_accounting.py gives every admitted group its fate from
independent sources (Redis's dedup keys, the learner's metrics.jsonl, the dead stream, the streams' entries):
groups_lost and groups_duplicated, and conservation (admitted = trained + dropped + dead-lettered + pending). A run
passes when nothing is lost or duplicated, conservation holds, the learner finished its steps, every injection was
made and recovered from, and the scenario's own check holds. The bench's JSON sums the runs and keeps each one's.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from types import FrameType
from typing import Any

from common.logs import IsoFormatter
from common.progress import bar
from experiments.chaos_accounting import Sources, account
from experiments.chaos_config import ChaosConfig, ChaosFailed, Scenario, load_chaos_config
from experiments.chaos_probe import Probe, ProbeHandle

__all__ = ["ChaosConfig", "ChaosFailed", "load_chaos_config", "run_chaos", "run_scenario"]

log = logging.getLogger(__name__)


SUMMED = ("groups_admitted", "groups_trained", "groups_dropped_stale", "groups_dropped_zero_variance",
          "groups_dead_lettered", "groups_pending_end", "groups_lost", "groups_duplicated")  # fmt: skip


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Run every scenario of `cfg`; return the bench's JSON object (raises nothing the runs caused)."""
    from common.config import ConfigError, dump_config
    from deploy.launcher.rundir import RunDir

    root = RunDir.at(cfg.up.run_dir).root
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"--up.run_dir {cfg.up.run_dir} holds a previous run: choose another or remove it")
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "chaos_config.json")
    t0 = time.monotonic()
    runs: dict[str, dict[str, Any]] = {}
    with bar(len(cfg.scenarios), "bench chaos", "scenario") as progress:  # one `longtrace up` run each
        for name in cfg.scenarios:
            progress.set_postfix_str(name)
            runs[name] = run_scenario(cfg, name)
            progress.update()
    out: dict[str, Any] = {
        "ok": all(r["ok"] for r in runs.values()),
        "scenarios": list(runs),
        "kills": sum(r.get("kills", 0) for r in runs.values()),
        **{k: sum(r.get(k, 0) for r in runs.values()) for k in SUMMED},
        "duplicates_counted_from": "metrics",
        "conservation_ok": all(r.get("conservation_ok", False) for r in runs.values()),
        "finished": all(r.get("finished", False) for r in runs.values()),
        "failed": {name: r["failures"] for name, r in runs.items() if r["failures"]},
        "appendfsync": cfg.appendfsync,
        "ratio": None,
        "no_ratio": "a reliability bench: pass means every scenario recovered with groups_lost = groups_duplicated = 0",
        "seconds": round(time.monotonic() - t0, 1),
        "runs": runs,
    }
    (root / "chaos.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def run_scenario(cfg: ChaosConfig, name: Scenario) -> dict[str, Any]:
    """One scenario's `longtrace up` run with its injector, then its accounting and checks."""
    from contextlib import ExitStack

    from common.supervisor import ChildFailed
    from deploy.launcher.dashboard import Dashboard
    from deploy.launcher.rundir import RunDir
    from deploy.launcher.up import Interrupted, Launcher
    from experiments import chaos_scenarios as sc

    t0 = time.monotonic()
    failures: list[str] = []
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        extra: dict[str, Any] = {}
        stub = None
        if name == "judge_outage":
            stub, extra = _judge_stub(cfg, stack)
        up = sc.scenario_up(cfg, name, extra)
        run = RunDir.at(up.run_dir)
        run.logs.mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(run.logs / "launcher.log")
        file_log.setFormatter(IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))  # UTC ISO 8601
        logging.getLogger().addHandler(file_log)
        stack.callback(file_log.close)
        stack.callback(logging.getLogger().removeHandler, file_log)
        launcher = Launcher(up, Dashboard(run, "off"))
        probes = ProbeHandle(launcher, cfg.target_phase)
        stack.callback(probes.close)
        injector: sc.Injector
        if name in ("kills", "learner_crash_loop"):
            injector = sc.Kills(cfg, launcher, probes, crash_loop=name == "learner_crash_loop")
        elif name == "judge_outage":
            injector = sc.JudgeOutage(cfg, launcher, stub)
        elif name == "regex_bomb":
            from experiments.chaos_regex_bomb import RegexBomb

            injector = RegexBomb(cfg, launcher)
        elif name == "reject_task":
            injector = sc.RejectTask(cfg, launcher)
        elif name == "long_generations":
            injector = sc.LeaseCheck(cfg, launcher)
        else:
            injector = sc.OversizedCheck(cfg, launcher)
        launcher.on_tick = injector.tick
        log.warning("chaos: scenario %s in %s", name, run.root)

        def interrupt(sig: int, frame: FrameType | None) -> None:
            raise Interrupted(sig)

        # SIGTERM as Ctrl-C: stop every child in order (a bare exit would leave workers retrying a dead Redis).
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            launcher.run_all()
            if left := injector.pending():
                raise ChaosFailed(
                    f"the learner finished its steps before {left} were injected and recovered from: raise the steps"
                )
        except (ChildFailed, ChaosFailed) as e:
            failures.append(str(e))
            log.error("chaos scenario %s failed: %s", name, e)
        except Interrupted as e:
            failures.append(f"interrupted by {e}")
        finally:
            for s in previous:  # a second signal skips the grace periods instead of interrupting the shutdown
                signal.signal(s, lambda *_: launcher.sup.hurry())
            try:
                result = _account(cfg, launcher, probes.get(), up)  # Redis still up
            except Exception as e:  # noqa: BLE001 - reported as this run's failure, the other scenarios go on
                failures.append(f"accounting failed: {e!r}")
            try:
                launcher.sup.stop_all(up.shutdown_timeout_s)
                launcher.write_processes()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        acc = result.pop("_accounting", None)
        letters = result.pop("_letters", None) or []
        if acc is not None:
            failures += [f"conservation: {p}" for p in acc.problems]
            if acc.groups_lost or acc.groups_duplicated:
                failures.append(f"{acc.groups_lost} groups lost, {acc.groups_duplicated} duplicated: {acc.examples}")
            failures += injector.check(acc, letters)
        if not result.get("finished"):
            failures.append("the learner did not finish its steps")
        out = {"ok": not failures, "failures": failures, **result, **injector.report()}
        out["seconds"] = round(time.monotonic() - t0, 1)
        out["run_dir"] = str(run.root)
        (run.root / "chaos.json").write_text(json.dumps(out, indent=2) + "\n")
        return out


def _account(cfg: ChaosConfig, launcher: Any, probe: Probe, up: Any) -> dict[str, Any]:
    """The accounting of the run's target phase from its independent sources, and the end state of the queue."""
    from learner.metrics import read_metrics

    phase = cfg.target_phase
    letters = probe.dead_letters()
    metrics_path = launcher.run.phase_dir(phase)
    try:
        lines: list[dict[str, Any]] | None = read_metrics(metrics_path)
    except (OSError, ValueError):
        lines = None
    from broker.base import TASKS

    steps = up.phases[phase].steps
    acc = account(
        Sources(
            admitted=probe.published(TASKS),
            metrics_lines=lines,
            dead_group_ids=None if letters is None else {x.group_id for x in letters if x.group_id},
            pending_group_ids=probe.entry_group_ids(),
            steps=steps,
        )
    )
    streams = probe.streams()
    stuck = {
        f"{stream}/{group}/{consumer}": held
        for stream, info in streams.items()
        for group, g in info["groups"].items()
        for consumer, held in g["holding"].items()
    }
    # The launcher samples the namespace once more after the learner exits, before the phase's processes stop.
    last = [x for x in launcher.run.system() if x.get("phase") == phase][-1:] or [{}]
    lineage_steps = max((int(m["step"]) for m in lines or []), default=0)
    return {
        "_accounting": acc,
        "_letters": letters,
        **acc.to_json(),
        "dead_letter_reasons": sorted({x.reason[:80] for x in letters or []})[:5],
        "entries_left": {s: info["length"] for s, info in streams.items()},
        "consumers_holding_entries": stuck,
        # Steps logged twice: trained, lost with a killed learner, trained again after its restart.
        "steps_retrained": len(lines or []) - steps,
        "finished": lineage_steps == steps,
        "policy_version": last[0].get("policy_version"),
        "engine_versions": sorted(last[0].get("engine_versions", [])),
    }


def _judge_stub(cfg: ChaosConfig, stack: Any) -> tuple[Any, dict[str, Any]]:
    """An OpenAI-compatible judge in this process, and the reward config that points the workers at it with short
    retries (so the outage outlasts them)."""
    from experiments.judge_stub import JudgeStub, JudgeStubConfig

    stub = JudgeStub(JudgeStubConfig(delay_s=0.0, concurrency=64))
    server = stack.enter_context(stub.serve())
    judge = {
        "kind": "llm",
        "base_url": f"{server.url}/v1",
        "api_key_env": "",
        "model": "judge-stub",
        "timeout_s": 5.0,
        "retry": {"max_attempts": 2, "base_s": 0.2, "max_backoff_s": 1.0, "deadline_s": 10.0},
    }
    retry = {"max_attempts": 2, "base_s": 0.5, "max_backoff_s": 1.0}
    return stub, {"reward": {"config": {"judge": judge, "worker": {"retry": retry}}}}
