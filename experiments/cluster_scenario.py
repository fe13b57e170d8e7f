"""One multi-node run of the shipped scripts (deploy/torchrun/*.sh) across network namespaces, and its accounting.

Nodes: `rollout` runs redis.sh, reward.sh, engine.sh and rollout.sh; `learner0..N-1` run learner.sh (NNODES=N,
NPROC_PER_NODE=1, gloo, c10d rendezvous at learner0's host name). Every node reads one cluster.env (LT_ENV_FILE), as a
user would copy it to 5 machines; only NODE_RANK differs between learner nodes. NODE_ADDR is left to env.sh (the
namespace's `hostname -I`), the interface to NCCL_SOCKET_IFNAME (lt0), so the weight-update group binds each learner
node's own address. The run directory is the "shared filesystem". Faults: delay, jitter and loss on every link from
the start (netem, or the harness's userspace relay where the kernel has no sch_netem) and, once the learner has logged
steps, partitions (a node's link down for `partition_s`) or a Redis stall (redis-server frozen for `redis_stall_s`).
The accounting is the chaos bench's (experiments/cluster_results.py), read through its Probe from this host.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.progress import bar
from experiments.cluster_config import REPO, ClusterConfig
from experiments.cluster_results import account_run, link_label

if TYPE_CHECKING:
    from deploy.cluster.netns import Shaper

log = logging.getLogger(__name__)

TORCHRUN = REPO / "deploy" / "torchrun"
ROLLOUT = "rollout"
NOTE = (
    "every node is a network namespace of this one machine: they share its CPU cores and memory, so this measures the "
    "multi-node wiring, timeouts and recovery, not bandwidth or multi-machine throughput"
)


class ClusterRunFailed(RuntimeError):
    """A process of the cluster failed or a deadline passed; the message has the logs' tails."""


def write_inputs(cfg: ClusterConfig, run_dir: Path) -> dict[str, str]:
    """The tiny model and data (the UpConfig's [prepare], shared by the runs) and each role's config file; the
    variables of cluster.env that name them."""
    from common.config import load_config
    from deploy.launcher.config import PLACEHOLDER_REDIS_URL, UpConfig
    from deploy.launcher.prepare import prepare_tiny_demo
    from deploy.launcher.tomlfile import write_config

    up = load_config(UpConfig, cfg.up_path())
    shared = Path(cfg.run_dir)
    model, data = shared / "model", shared / "data"
    assert up.prepare is not None, f"{cfg.up_config} has no [prepare] section"
    prepare_tiny_demo(up.prepare, data, model)
    confs = run_dir / "configs"
    confs.mkdir(parents=True, exist_ok=True)
    train = up.train_config(PLACEHOLDER_REDIS_URL, cfg.phase, str(model), str(data / "train.jsonl"), str(run_dir))
    train.max_steps = cfg.steps
    train.checkpoint.interval_steps = cfg.steps
    train.tracking.backends = ["jsonl"]
    ws = train.weight_sync
    assert ws.type == "distributed", f"{cfg.up_config}: the cluster pushes weights over the network (distributed)"
    ws.init_timeout_s = ws.broadcast_timeout_s = cfg.weight_sync_timeout_s
    train.model.dist_timeout_s = ws.attempt_bound_s + 30
    engine = up.engine_config(PLACEHOLDER_REDIS_URL, cfg.phase, 0, 30000, str(model))
    (confs / "engine.toml").write_text(
        'backend = "builtin"\nheartbeat_interval_s = 0.5\nheartbeat_ttl_s = 5.0\n'
        f"context_length = {engine.context_length}\n"
    )
    return {
        "LEARNER_CONFIG": str(write_config(train, confs / "learner.toml")),
        "ENGINE_CONFIG": str(confs / "engine.toml"),
        "ROLLOUT_CONFIG": str(
            write_config(up.rollout_config(PLACEHOLDER_REDIS_URL, cfg.phase, 0), confs / "rollout.toml")
        ),
        "REWARD_CONFIG": str(
            write_config(up.reward_config(PLACEHOLDER_REDIS_URL, cfg.phase, 7248), confs / "reward.toml")
        ),
        "MODEL_PATH": str(model.resolve()),
        "DATA_PATH": str((data / "train.jsonl").resolve()),
        "RUN_DIR": str(run_dir.resolve()),
    }


def cluster_env(cfg: ClusterConfig, cluster: Any, files: dict[str, str], run_id: str) -> dict[str, str]:
    """cluster.env's variables: the same file on every node."""
    return {
        **files,
        "RUN_ID": run_id,
        "REDIS_HOST": cluster.node(ROLLOUT).hostname,
        "REDIS_PORT": "6379",
        "REDIS_PASSWORD": secrets.token_hex(12),
        "NNODES": str(cfg.learner_nodes),
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"{cluster.node('learner0').hostname}:29400",
        "NCCL_SOCKET_IFNAME": "lt0",
        "LONGTRACE_REWARD_API_KEY": secrets.token_hex(12),
        "LONGTRACE_ENGINE_API_KEY": secrets.token_hex(12),
        "NUM_REWARD_WORKERS": "1",
        "NUM_WORKERS": "1",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def _tails(logs: dict[str, Path], chars: int = 2500) -> str:
    return "\n".join(f"--- {n}\n{p.read_text(errors='replace')[-chars:]}" for n, p in logs.items() if p.is_file())


def run_cluster(
    cfg: ClusterConfig,
    delay_ms: float,
    faults: Sequence[str],
    run_dir: Path,
    learner_env: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One run: the cluster up, the scripts started, faults applied, the learners to their end; the result.
    `learner_env`: variables set on the learner nodes only (e.g. WEIGHT_SYNC_ADDR)."""
    from deploy.cluster.netns import Cluster

    run_dir.mkdir(parents=True, exist_ok=True)
    files = write_inputs(cfg, run_dir)
    run_id = f"cluster-{secrets.token_hex(3)}"
    names = [ROLLOUT] + [f"learner{i}" for i in range(cfg.learner_nodes)]
    logs: dict[str, Path] = {}
    shaper = _shaper(cfg) if delay_ms else None
    result: dict[str, Any] = {
        "delay_ms": delay_ms,
        "jitter_ms": cfg.jitter_ms if delay_ms else 0.0,
        "loss_pct": cfg.loss_pct if delay_ms else 0.0,
        "shaper": shaper or "off",
    }
    with Cluster(names, shaper=shaper) as c:
        values = cluster_env(cfg, c, files, run_id)
        env_file = run_dir / "cluster.env"
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in values.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGTRACE_", "REDIS_", "NODE_"))}
        env |= {"LT_ENV_FILE": str(env_file), "PYTHONUNBUFFERED": "1"}
        result["nodes"] = {n.name: n.address for n in c.nodes.values()}
        if shaper:
            for name in c.nodes:
                c.shape(name, delay_ms, cfg.jitter_ms, cfg.loss_pct)
        redis_url = f"redis://:{values['REDIS_PASSWORD']}@{c.node(ROLLOUT).address}:6379/0"

        def start(node: str, script: str, name: str, extra: dict[str, str] | None = None, *args: str) -> Any:
            logs[name] = run_dir / "logs" / f"{name}.log"
            logs[name].parent.mkdir(exist_ok=True)
            return c.popen(node, ["bash", str(TORCHRUN / script), *args], env | (extra or {}), logs[name], cwd=REPO)

        services = {"redis": start(ROLLOUT, "redis.sh", "redis")}
        probe = _wait_redis(cfg, redis_url, run_id, services, logs)
        try:
            services["reward"] = start(ROLLOUT, "reward.sh", "reward")
            services["engine"] = start(ROLLOUT, "engine.sh", "engine")
            services["rollout"] = start(ROLLOUT, "rollout.sh", "rollout")
            _until(lambda: bool(probe.engines()), cfg.startup_timeout_s, services, logs, "the engine to register")
            result["reward_api"] = _reward_api_check(c.node(ROLLOUT).address, values["LONGTRACE_REWARD_API_KEY"])
            t0 = time.monotonic()
            # A partition past the collective timeout ends the job on every node; a user (or the cluster's
            # scheduler) starts the learners again once the network is back, and they resume from the checkpoint.
            rerun = "partition_learner_long" in faults
            args = ("--checkpoint.interval_steps", "1") if rerun else ()

            def start_learners(suffix: str = "") -> dict[str, Any]:
                env_i = learner_env or {}
                return {f"learner{i}{suffix}": start(f"learner{i}", "learner.sh", f"learner{i}{suffix}",
                                                     env_i | {"NODE_RANK": str(i)}, *args)
                        for i in range(cfg.learner_nodes)}  # fmt: skip

            learners = start_learners()
            with open(values["LEARNER_CONFIG"], "rb") as f:
                dist_timeout_s = float(tomllib.load(f)["model"]["dist_timeout_s"])
            applied = _drive(cfg, c, faults, learners, services, logs, run_dir, t0, dist_timeout_s, progress)
            if rerun:
                result["first_exit_codes"] = {n: p.returncode for n, p in learners.items()}
                result["timeout_named"] = {n: "(--model.dist_timeout_s)" in logs[n].read_text() for n in learners}
                result["steps_before_rerun"] = _steps_done(run_dir)
                learners = start_learners("-rerun")
                _drive(cfg, c, [], learners, services, logs, run_dir, t0, dist_timeout_s, progress)
            result["wall_s"] = round(time.monotonic() - t0, 1)
            codes = {n: p.returncode for n, p in learners.items()}
            result.update(account_run(probe, run_dir, cfg.steps))
            result["faults"] = applied
            result["learner_exit_codes"] = codes
            result["finished"] = result["finished"] and all(code == 0 for code in codes.values())
            result["log_dir"] = str(run_dir / "logs")
            if not result["finished"]:
                result["logs_tail"] = _tails({n: logs[n] for n in learners}, 1500)
        finally:
            probe.close()
            for name in ("rollout", "engine", "reward", "redis"):
                if name in services:
                    c.stop(services[name])
    return result


def _shaper(cfg: ClusterConfig) -> Shaper:
    from deploy.cluster.netns import netem_available

    if cfg.shaper == "userspace":
        return "userspace"
    ok, why = netem_available()
    if cfg.shaper == "netem" and not ok:
        raise ClusterRunFailed(f"--shaper netem: {why}")
    if not ok:
        log.info("delay and loss by the userspace relay: %s", why)
    return "netem" if ok else "userspace"


def _wait_redis(cfg: ClusterConfig, url: str, run_id: str, procs: dict[str, Any], logs: dict[str, Path]) -> Any:
    from broker.base import BrokerError
    from experiments.chaos_probe import Probe

    deadline = time.monotonic() + cfg.startup_timeout_s
    while True:
        _check_alive(procs, logs)
        try:
            probe = Probe(url, run_id)
            if probe.policy_version() is not None or probe.engines() is not None:
                return probe
            probe.close()
        except BrokerError:
            pass
        if time.monotonic() > deadline:
            raise ClusterRunFailed(f"Redis not reachable at the rollout node within {cfg.startup_timeout_s:g}s\n"
                                   + _tails(logs))  # fmt: skip
        time.sleep(0.5)


def _reward_api_check(address: str, token: str) -> dict[str, int]:
    """The reward API answers on the rollout node's address, and only with its token."""
    import httpx

    url = f"http://{address}:7248"
    deadline = time.monotonic() + 60
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=5).status_code
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    body: dict[str, list[Any]] = {"rollouts": []}
    without = httpx.post(f"{url}/v1/score_group", json=body, timeout=5).status_code
    return {"health": health, "without_token": without}


def _check_alive(procs: dict[str, Any], logs: dict[str, Path]) -> None:
    for name, p in procs.items():
        if p.poll() is not None:
            raise ClusterRunFailed(f"{name} exited with {p.returncode}\n" + _tails({name: logs[name]}, 4000))


def _until(pred: Any, timeout_s: float, procs: dict[str, Any], logs: dict[str, Path], what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        _check_alive(procs, logs)
        if time.monotonic() > deadline:
            raise ClusterRunFailed(f"timed out after {timeout_s:g}s waiting for {what}\n" + _tails(logs))
        time.sleep(0.3)


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _drive(
    cfg: ClusterConfig,
    c: Any,
    faults: Sequence[str],
    learners: dict[str, Any],
    services: dict[str, Any],
    logs: dict[str, Path],
    run_dir: Path,
    t0: float,
    dist_timeout_s: float,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Wait for the learners to exit, applying `faults` on the way; the faults applied (with their step).
    `progress(steps)`: told the steps this run has logged so far (metrics.jsonl's lines), e.g. to move a bar."""
    targets = {"partition_rollout": ROLLOUT, "partition_learner": "learner1", "partition_learner_long": "learner1"}
    # Long: past the learners' collective timeout (their model.dist_timeout_s), so every rank's collective fails.
    lasts = {f: cfg.partition_s + (dist_timeout_s if f == "partition_learner_long" else 0) for f in targets}
    lasts["redis_stall"] = cfg.redis_stall_s

    def begin(fault: str) -> Callable[[], None]:
        """Start `fault`; the call that ends it."""
        if fault == "redis_stall":  # frozen, not down: every client's calls time out, on every node alike
            group = services["redis"].pid
            os.killpg(group, signal.SIGSTOP)
            return lambda: os.killpg(group, signal.SIGCONT)
        c.partition(targets[fault])
        return lambda: c.heal(targets[fault])

    pending = list(faults)
    applied: list[str] = []
    active: tuple[Callable[[], None], float] | None = None  # (its end, when)
    try:
        while any(p.poll() is None for p in learners.values()):
            _check_alive(services, logs)
            now = time.monotonic()
            if now - t0 > cfg.run_timeout_s:
                raise ClusterRunFailed(f"the learners ran past {cfg.run_timeout_s:g}s\n" + _tails(logs))
            if active is not None and now >= active[1]:
                active[0]()
                active = None
            step = _steps_done(run_dir)
            if progress is not None:
                progress(min(step, cfg.steps))
            if active is None and pending and step >= cfg.fault_after_step * (len(applied) + 1):
                fault = pending.pop(0)
                active = (begin(fault), now + lasts[fault])
                applied.append(f"{fault} ({lasts[fault]:g}s after step {step})")
                log.info("fault: %s", applied[-1])
            time.sleep(0.2)
    finally:
        if active is not None:
            active[0]()
    return applied + [f"{f} (not reached)" for f in pending]


def run_bench(cfg: ClusterConfig) -> dict[str, Any]:
    """`longtrace bench cluster`: a clean run per delay, the faults in the last one; the summary."""
    cfg = cfg.model_copy(update={"run_dir": str(Path(cfg.run_dir).resolve())})
    runs = []
    with bar(len(cfg.delays_ms) * cfg.steps, "bench cluster", "step") as steps_bar:
        for i, delay in enumerate(cfg.delays_ms):
            faults = list(cfg.faults) if i == len(cfg.delays_ms) - 1 else []

            def moved(steps: int, base: int = i * cfg.steps) -> None:
                steps_bar.update(base + steps - steps_bar.n)

            runs.append(run_cluster(cfg, delay, faults, Path(cfg.run_dir) / f"{delay:g}ms", progress=moved))
    by_delay = {f"{r['delay_ms']:g}ms": r for r in runs}
    return {
        "nodes": 1 + cfg.learner_nodes,
        "learner_nodes": cfg.learner_nodes,
        "steps": cfg.steps,
        "steps_per_min": {k: r["steps_per_min"] for k, r in by_delay.items()},
        "push_s": {k: r["push_s_median"] for k, r in by_delay.items()},
        "link": {k: link_label(r) for k, r in by_delay.items()},
        "faults": [f for r in runs for f in r["faults"]],
        "groups_lost": sum(r["groups_lost"] for r in runs),
        "groups_duplicated": sum(r["groups_duplicated"] for r in runs),
        "conservation_ok": all(r["conservation_ok"] for r in runs),
        "finished": all(r["finished"] for r in runs),
        "note": NOTE,
        "ratio": None,
        "no_ratio": "a wiring and recovery bench on one machine's namespaces: no baseline to compare with (see note)",
        "runs": runs,
    }
