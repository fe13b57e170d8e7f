"""`longtrace up CONFIG`: the whole system on one machine, phase after phase, under one supervisor.

    prepare (job)  ->  redis  ->  reward API
    for each phase (namespace <run_id>-<phase>, RUN_DIR/phases/<phase>):
        engines (start weights: base model or the previous phase's last export)
        rl: reward workers, rollout workers          sft: the demonstration source (sft_source.py)
        eval before (optional, job)
        learner: torchrun --nproc_per_node N -m learner.train_cli (job; the feeder runs on rank 0)
            rl with [eval] every_steps: in-training evals on the serving engines meanwhile (live_eval.py)
        eval after (job), then the phase's processes are stopped in reverse order
    report (RUN_DIR/report)

Each phase is a fresh learner on a fresh namespace: its policy version starts at 0 with engines that load the
phase's starting weights, so admission control and staleness need no carry-over between phases. Any child
failure (or a service that is not ready in time) stops everything and prints the process, its exit code and
the tail of its log; Ctrl-C or SIGTERM stops everything in reverse start order (a second one kills at once).
How each child is started (argv, environment, readiness) is in specs.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from broker.settings import BrokerConfig
from common.config import BaseConfig, ConfigError, dump_config
from common.logs import IsoFormatter
from common.supervisor import Child, ChildFailed, ProcessSpec, Supervisor
from deploy.launcher import specs
from deploy.launcher.config import UpConfig
from deploy.launcher.dashboard import Dashboard, PhaseView, SystemSampler, resolve_mode
from deploy.launcher.live_eval import LiveEval, eval_job, start_live_eval
from deploy.launcher.rundir import POLICY_VERSION, STEP, RunDir
from deploy.launcher.sections import PhaseConfig
from deploy.launcher.specs import CHILD_ENV, threads_env
from deploy.launcher.tomlfile import write_config
from learner.train_config import TrainConfig

log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the launcher (a BaseException, like KeyboardInterrupt: no `except Exception`
    on the way may swallow it)."""

    def __init__(self, sig: int) -> None:
        super().__init__(signal.Signals(sig).name)
        self.sig = sig


class Launcher:
    """Runs the phases of one UpConfig under one Supervisor; `run_up` owns the signals and the final shutdown."""

    def __init__(self, cfg: UpConfig, dashboard: Dashboard) -> None:
        self.cfg = cfg
        self.run = RunDir.at(cfg.run_dir)
        self.sup = Supervisor(self.run.logs)
        self.dashboard = dashboard
        # The launcher's own clients (namespace check, dashboard, chaos probe) use the URL as given; the services
        # get it without its password in their config files, and the password in their environment.
        self.redis_url = cfg.redis.url
        self.child_redis_url, self.redis_password = cfg.redis.child_url_and_password()
        self.reward_url = ""
        self.model_path = cfg.base_model_path()
        self.global_step = 0
        # Called on every dashboard tick while a job runs; the chaos bench (experiments/chaos.py) injects its faults
        # here, killing and respawning children through `self.sup` (Supervisor.kill / respawn).
        self.on_tick: Callable[[], None] | None = None

    # -- helpers

    def _config_file(self, name: str, config: BaseConfig) -> str:
        return str(write_config(config, self.run.configs / f"{name}.toml"))

    def _broker_env(self, env: dict[str, str], broker: BrokerConfig) -> dict[str, str]:
        """`env` plus the Redis password, in the variable the service's BrokerConfig reads it from: the
        environment of a process is readable only by its user, its argv by everyone (ps)."""
        if self.redis_password is None:
            return env
        return {**env, broker.redis_password_env: self.redis_password}

    def _event(self, **event: Any) -> None:
        with self.run.phases_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time_s": round(time.time(), 3), **event}) + "\n")

    def _wait(self, child: Child, timeout_s: float = 0.0, live: LiveEval | None = None) -> None:
        """Wait for a job, refreshing the dashboard (and running `live`'s evals); fail the run past `timeout_s`."""
        start = time.monotonic()

        def tick() -> None:
            self.dashboard.update()
            if live is not None:
                live.tick()
            if self.on_tick is not None:
                self.on_tick()
            if timeout_s and time.monotonic() - start > timeout_s:
                raise ChildFailed(child.name, f"ran longer than {timeout_s:.0f}s", child.log_path, child.log_tail())

        self.sup.wait(child, tick=tick, tick_s=self.cfg.dashboard.refresh_s)
        if live is not None:
            live.finish()

    # -- run-wide services

    def prepare(self) -> None:
        p = self.cfg.prepare
        if p is None:
            return
        from deploy.launcher.prepare import is_prepared

        model_dir = Path(self.cfg.run_dir) / "model"
        data_dir = self.cfg.data_dir
        if is_prepared(p, data_dir, model_dir):
            return
        self.dashboard.note("preparing the demo data and the tiny model")
        path = str(write_config(p, self.run.configs / "prepare.toml"))
        self._wait(self.sup.start(specs.prepare(path, str(data_dir), str(model_dir))))

    def start_redis(self) -> None:
        from common.net import free_port
        from deploy.launcher import redis_checks

        phase_ids = [self.cfg.phase_run_id(name) for name in self.cfg.phases]
        if self.redis_url:
            warnings = redis_checks.check_given_redis(self.redis_url, phase_ids, self.cfg.run_id)
        else:
            r = self.cfg.redis
            port = r.port or free_port()
            data_dir = str(Path(self.cfg.run_dir) / "redis")
            self.redis_url = self.child_redis_url = f"redis://127.0.0.1:{port}/0"
            self.sup.start(specs.redis(port, data_dir, r.appendonly, r.appendfsync, self.cfg.startup_timeout_s))
            warnings = redis_checks.check_durability(self.redis_url, phase_ids[0])  # [redis] appendonly off
        for w in warnings:
            self.dashboard.note(f"WARNING: {w}")

    def start_reward_api(self) -> None:
        from common.net import free_port

        if not self.cfg.reward.serve:
            return
        port = free_port()
        cfg = self.cfg.reward_config(self.child_redis_url, next(iter(self.cfg.phases)), port)
        path = self._config_file("reward-api", cfg)
        self.reward_url = f"http://127.0.0.1:{port}"
        env = self._broker_env(CHILD_ENV, cfg.broker)
        self.sup.start(specs.reward_api(path, self.reward_url, env, self.cfg.startup_timeout_s))

    # -- one phase

    def phase_model(self, index: int, name: str) -> str:
        if self.cfg.phases[name].init == "base" or index == 0:
            return self.model_path
        from weights.exports import latest_export

        prev = list(self.cfg.phases)[index - 1]
        found = latest_export(self.run.phase_dir(prev) / "exports")
        if found is None:
            raise ConfigError(f"--phases.{name}.init previous: phase {prev!r} left no export in its exports/")
        return str(found[0])

    def run_phase(self, index: int, name: str) -> None:
        phase = self.cfg.phases[name]
        self._event(phase=name, kind=phase.kind, event="start", steps=phase.steps, index=index)
        try:
            from deploy.launcher.redis_checks import start_run

            # Before any of its services attaches: a Redis that loses the run's data is then never taken for a new run.
            start_run(self.redis_url, self.cfg.phase_run_id(name))
            self._run_phase(index, name, phase)
        except BaseException as e:
            status = "interrupted" if isinstance(e, Interrupted) else "failed"
            self._event(phase=name, kind=phase.kind, event="end", status=status, index=index)
            raise
        self._event(phase=name, kind=phase.kind, event="end", status="ok", index=index)

    def _run_phase(self, index: int, name: str, phase: PhaseConfig) -> None:
        from common.net import free_port

        cfg = self.cfg
        phase_dir = self.run.phase_dir(name)
        model = self.phase_model(index, name)
        dataset = cfg.phase_dataset_path(phase)
        train = cfg.train_config(self.child_redis_url, name, model, dataset, str(phase_dir))
        log.info("phase %s starts from %s", name, model)
        self.dashboard.start_phase(
            PhaseView(name, phase.kind, index, len(cfg.phases), phase.steps),
            SystemSampler(self.redis_url, cfg.phase_run_id(name)),
        )
        started: list[Child] = []

        def start(spec: ProcessSpec, wait_ready: bool = True) -> Child:
            child = self.sup.start(spec, wait_ready=wait_ready)
            started.append(child)
            return child

        # Engines load their weights in parallel; then everything that needs them.
        engines, engine_urls = [], []
        for i in range(cfg.engines.num_engines):
            port = free_port()
            ecfg = cfg.engine_config(self.child_redis_url, name, i, port, model)
            assert ecfg.broker is not None  # the launcher always gives engines its broker (the registry)
            path = self._config_file(f"{name}-engine-{i}", ecfg)
            env = self._broker_env(threads_env(cfg.engines.num_threads), ecfg.broker)
            url = f"http://127.0.0.1:{port}"
            spec = specs.engine(f"{name}-engine-{i}", path, url, env, cfg.startup_timeout_s)
            engines.append(start(spec, wait_ready=False))
            engine_urls.append(url)
        for child in engines:
            self.sup.wait_ready(child)
        if phase.kind == "rl":
            self._start_rl_services(name, start)
        else:
            self._start_sft_source(name, phase, train, dataset, model, start)
        if phase.eval_before:
            self.evaluate(name, "before", engine_urls, model, expect_version=0)
        learner = self._start_learner(name, train, start)
        self._wait(learner, cfg.phase_timeout_s, start_live_eval(self, name, phase, engine_urls, model))
        self.dashboard.update()
        steps = self.run.metrics(name)
        # A learner may end before phase.steps only by its early_stop rule, which marks its last step.
        stopped_early = bool(steps) and bool(steps[-1].get("stopped_early"))
        if not steps or (steps[-1][STEP] != phase.steps and not stopped_early):
            raise ChildFailed(
                learner.name,
                f"exited 0 after {len(steps)} logged steps, expected {phase.steps}",
                learner.log_path,
                learner.log_tail(),
            )
        if stopped_early:
            log.info("phase %s stopped early at step %d of %d (learner early_stop)", name, steps[-1][STEP], phase.steps)
        self.global_step += int(steps[-1][STEP])
        if phase.eval_after:
            version = int(steps[-1][POLICY_VERSION])
            self.evaluate(name, "after", engine_urls, model, expect_version=version)
        for child in reversed(started):
            self.sup.stop(child)
        self.dashboard.end_phase()

    def _start_rl_services(self, name: str, start: Callable[..., Child]) -> None:
        cfg = self.cfg
        for i in range(cfg.reward.num_workers):
            rcfg = cfg.reward_config(self.child_redis_url, name, 0, consumer=f"reward-{i}")
            path = self._config_file(f"{name}-reward-{i}", rcfg)
            env = self._broker_env(CHILD_ENV, rcfg.broker)
            grace_s = rcfg.worker.shutdown_timeout_s + 5
            start(specs.reward_worker(f"{name}-reward-worker-{i}", path, env, cfg.startup_timeout_s, grace_s))
        for i in range(cfg.rollout.num_workers):
            ocfg = cfg.rollout_config(self.child_redis_url, name, i)
            path = self._config_file(f"{name}-rollout-{i}", ocfg)
            env = self._broker_env(CHILD_ENV, ocfg.broker)
            grace_s = ocfg.shutdown_timeout_s + 5
            start(specs.rollout_worker(f"{name}-rollout-{i}", path, env, cfg.startup_timeout_s, grace_s))

    def _start_sft_source(
        self, name: str, phase: PhaseConfig, train: TrainConfig, dataset: str, model: str, start: Callable[..., Child]
    ) -> None:
        from deploy.launcher.sft_source import SftSourceConfig

        broker = self.cfg.reward_config(self.child_redis_url, name, 0).broker
        scfg = SftSourceConfig(
            broker=broker,
            dataset_path=dataset,
            tokenizer_path=model,
            groups_per_step=train.data.groups_per_step,
            max_staleness=train.data.max_staleness,
            num_steps=phase.steps,
            seed=train.data.seed,
        )
        path = self._config_file(f"{name}-sft-source", scfg)
        start(specs.sft_source(f"{name}-sft-source", path, self._broker_env(CHILD_ENV, broker)))

    def _start_learner(self, name: str, train: TrainConfig, start: Callable[..., Child]) -> Child:
        from common.net import free_port

        path = self._config_file(f"{name}-learner", train)
        env = self._broker_env(threads_env(self.cfg.learner.num_threads), train.broker)
        return start(specs.learner(f"{name}-learner", path, self.cfg.learner.nproc_per_node, free_port(), env))

    def evaluate(self, phase: str, when: str, engine_urls: list[str], model: str, expect_version: int) -> None:
        out_path = str(self.run.eval_file)
        ecfg = eval_job(self, phase, when, engine_urls, model, out_path=out_path, step=self.global_step,
                        expect_version=expect_version)  # fmt: skip
        name = f"{phase}-eval-{when}"
        path = self._config_file(name, ecfg)
        split = (
            "the questions of --eval.dataset_path" if self.cfg.eval.dataset_path else f"the {self.cfg.eval.split} split"
        )
        self.dashboard.note(f"evaluating {phase} ({when}) on {split}")
        self._wait(self.sup.start(specs.evaluation(name, path)))
        result = self.run.evals()[-1]
        self.dashboard.note(
            f"{self.cfg.eval.split if not self.cfg.eval.dataset_path else 'eval'} {phase}/{when}: accuracy {result['accuracy']:.3f} rubric hits "
            f"{result['rubric_hit_rate']:.3f} well-formed {result['well_formed_rate']:.3f}"
        )

    # -- everything

    def run_all(self) -> None:
        self.prepare()
        self.start_redis()
        self.start_reward_api()
        for i, name in enumerate(self.cfg.phases):
            self.run_phase(i, name)

    def write_processes(self) -> None:
        procs = [
            {
                "name": c.name,
                "argv": c.spec.argv,
                "pid": c.pid,
                "exit_code": self.sup.exit_codes.get(c.name),
                "killed": c.killed,
                "log": str(c.log_path),
            }
            for c in self.sup.children
        ]
        self.run.processes_file.write_text(json.dumps(procs, indent=2) + "\n")


def run_up(cfg: UpConfig, dashboard_mode: str | None = None, out: Any = None) -> int:
    """Run `cfg` to the end; 0 on success, 1 when a process failed, 130 when interrupted."""
    out = out or sys.stdout
    run = RunDir.at(cfg.run_dir)
    if run.phases_file.exists():
        raise ConfigError(f"--run_dir {cfg.run_dir} holds a previous run: choose another --run_dir or remove it")
    run.root.mkdir(parents=True, exist_ok=True)
    run.logs.mkdir(exist_ok=True)
    dump_config(cfg, run.config)
    file_log = logging.FileHandler(run.logs / "launcher.log")
    file_log.setFormatter(IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))  # UTC ISO 8601
    logging.getLogger().addHandler(file_log)
    dashboard = Dashboard(run, resolve_mode(dashboard_mode or cfg.dashboard.mode, out), out)
    launcher = Launcher(cfg, dashboard)

    def interrupt(sig: int, frame: FrameType | None) -> None:
        raise Interrupted(sig)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        launcher.run_all()
        dashboard.note(f"all {len(cfg.phases)} phases finished")
    except ChildFailed as e:
        code = 1
        dashboard.note(f"FAILED: process {e.name!r} {e.reason}")
        print(f"\nlongtrace up: {e}", file=sys.stderr)
    except Interrupted as e:
        code = 130
        dashboard.note(f"{e}: stopping every process")
    finally:
        # A second Ctrl-C skips the grace periods instead of interrupting the shutdown.
        for s in previous:
            signal.signal(s, lambda *_: launcher.sup.hurry())
        try:
            launcher.sup.stop_all(cfg.shutdown_timeout_s)
            launcher.write_processes()
            dashboard.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            logging.getLogger().removeHandler(file_log)
            file_log.close()
    if code == 0 and cfg.report:
        from deploy.report import write_report

        path = write_report(run.root)
        dashboard.note(f"report: {path}")
    print(f"longtrace up: run directory {run.root} (logs in {run.logs}){_tensorboard_note(cfg)}", file=out, flush=True)
    return code


def _tensorboard_note(cfg: UpConfig) -> str:
    """Where the learners' TensorBoard event files are (those written), and the command that shows them."""
    dirs = [d for d in dict.fromkeys(cfg.tensorboard_dirs().values()) if d.is_dir()]
    if not dirs:
        return ""
    where = ", ".join(str(d) for d in dirs)
    return f"; TensorBoard event files in {where}: tensorboard --logdir {os.path.commonpath(dirs)}"
