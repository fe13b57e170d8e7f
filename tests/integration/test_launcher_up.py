"""`longtrace up` end to end on configs/debug/up.toml: every real process (Redis, reward API and worker, a
built-in engine, a rollout worker, the torchrun learner with 2 gloo ranks, the SFT source, evaluations)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from common.config import load_config
from deploy.launcher.config import UpConfig
from deploy.launcher.rundir import RunDir
from deploy.launcher.tomlfile import write_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "debug" / "up.toml"
PY = sys.executable


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debug config's data and tiny model, built once for the module (each run copies them)."""
    cfg = load_config(UpConfig, CONFIG)
    assert cfg.prepare is not None
    root = tmp_path_factory.mktemp("prepared")
    path = write_config(cfg.prepare, root / "prepare.toml")
    argv = [PY, "-m", "deploy.launcher.prepare", "--config", str(path), "--data-dir", str(root / "data")]
    subprocess.run([*argv, "--model-dir", str(root / "model")], check=True, timeout=300, capture_output=True)
    return root


def _run_dir(prepared: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for name in ("data", "model"):
        shutil.copytree(prepared / name, run / name)
    return run


def _up_argv(run: Path, *overrides: str) -> list[str]:
    return [PY, "-m", "deploy.cli", "up", str(CONFIG), "--no-dashboard", "--run_dir", str(run), *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _last_sample(run: RunDir, phase: str) -> dict[str, Any]:
    return [s for s in run.system() if s["phase"] == phase][-1]


@pytest.mark.slow
def test_up_runs_sft_then_rl_to_the_end(prepared: Path, tmp_path: Path) -> None:
    """Guards against the system not working as a whole: a phase that does not train its steps, versions that
    do not reach the engines, groups admitted but neither trained nor counted as dropped, entries left in the
    streams, a process that does not exit 0 on the ordered shutdown, missing logs, evaluations, TensorBoard event
    files (or an end-of-run line that does not say where they are) or report."""
    run_path = _run_dir(prepared, tmp_path)
    result = subprocess.run(_up_argv(run_path), capture_output=True, text=True, timeout=280, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[rl] step 3/3 v3" in result.stdout  # the non-TTY dashboard prints one line per step
    assert f"TensorBoard event files in {run_path / 'phases' / 'sft' / 'tensorboard'}" in result.stdout  # end line

    run = RunDir.at(run_path)
    processes = json.loads(run.processes_file.read_text())
    assert {p["name"]: p["exit_code"] for p in processes if p["exit_code"] != 0 or p["killed"]} == {}
    assert {"redis", "reward-api", "sft-engine-0", "sft-sft-source", "sft-learner", "rl-rollout-0"} <= {
        p["name"] for p in processes
    }
    for p in processes:
        assert Path(p["log"]).is_file(), p["name"]

    for phase, steps in (("sft", 2), ("rl", 3)):
        metrics = run.metrics(phase)
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        assert metrics[-1]["policy_version"] == steps  # one push per step
        last = _last_sample(run, phase)
        assert last["policy_version"] == steps and last["engine_versions"] == [steps]  # the engines got them
        assert (last["tasks"], last["rollouts"], last["scored"], last["dead"]) == (0, 0, 0, 0)  # nothing pending
        assert list((run.phase_dir(phase) / "tensorboard").glob("events.out.tfevents.*")), phase  # on by default

    rl = run.metrics("rl")[-1]
    accounted = rl["groups_trained"] + rl["groups_dropped_stale"] + rl["groups_dead_lettered"]
    assert rl["groups_admitted"] == accounted

    evals = {(e["phase"], e["when"]): e for e in run.evals()}
    assert set(evals) == {("sft", "before"), ("sft", "after"), ("rl", "after")}
    assert evals[("rl", "after")]["weight_versions"] == [3]
    assert (run.report_dir / "report.md").is_file() and (run.report_dir / "reward.png").is_file()


@pytest.mark.slow
def test_up_trains_a_mixture_of_experts_with_routing_replay(tmp_path: Path) -> None:
    """Guards routing replay across the real processes (configs/debug/up_moe.toml: a tiny Qwen3-MoE, EP2): a
    worker that stores a sample's routing under another sample's key or at shifted tokens, a learner that does not
    find it (dead-lettered groups) or does not replay it, or pushes that do not reach the engine. In step 1 the
    engine and the learner hold the same weights, so replayed experts must equal the learner's own top-2 (and the
    logprobs agree); later steps train on rollouts of older weights, whose routing the learner's no longer is."""
    run_path = tmp_path / "run"
    argv = [PY, "-m", "deploy.cli", "up", str(ROOT / "configs" / "debug" / "up_moe.toml"), "--no-dashboard"]
    result = subprocess.run(
        [*argv, "--run_dir", str(run_path)], capture_output=True, text=True, timeout=280, env=_env()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = RunDir.at(run_path)
    metrics = run.metrics("rl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["policy_version"] == 3
    assert _last_sample(run, "rl")["engine_versions"] == [3]
    for m in metrics:
        assert m["groups_dead_lettered"] == 0, m
        assert m["moe_replayed_fraction"] == pytest.approx(1 - m["padding_fraction"], rel=1e-6), m
    first = metrics[0]
    assert first["moe_replay_changed_fraction"] < 0.01 and first["is_abs_dev_mean"] < 1e-4, first
    assert max(m["moe_replay_changed_fraction"] for m in metrics[1:]) > 0.05  # replay overrides a drifted router


@pytest.mark.slow
def test_ctrl_c_stops_every_process(prepared: Path, tmp_path: Path) -> None:
    """Guards against orphans after Ctrl-C: the torchrun ranks, engines, workers and the redis-server (a
    grandchild in a session of its own) must all be gone once `longtrace up` returns, with exit code 130."""
    run_path = _run_dir(prepared, tmp_path)
    argv = _up_argv(run_path, "--phases.sft.steps", "500", "--phases.sft.eval_before", "false", "--report", "false")
    with (tmp_path / "up.out").open("w") as out:
        # Its own session, as a shell runs a foreground job: the SIGINT below reaches the launcher only.
        launcher = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert launcher.poll() is None, (tmp_path / "up.out").read_text()[-3000:]
            for p in psutil.Process(launcher.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
            ranks = [p for p in seen.values() if _is_rank(p)]
            if len(ranks) == 2 and (run_path / "phases" / "sft" / "metrics.jsonl").exists():
                break
            time.sleep(0.3)
        else:
            pytest.fail("the learner ranks did not start training in time")
        assert any("redis-server" in _cmd(p) for p in seen.values())
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=120) == 130
    finally:
        if launcher.poll() is None:
            launcher.kill()
    left = [p for p in seen.values() if _running(p)]
    assert left == [], [_cmd(p) for p in left]
    run = RunDir.at(run_path)
    assert run.phase_events()[-1] | {"time_s": 0} == {
        "time_s": 0, "phase": "sft", "kind": "sft", "event": "end", "status": "interrupted", "index": 0
    }  # fmt: skip
    assert json.loads(run.processes_file.read_text())


def test_up_refuses_a_namespace_in_use_on_a_given_redis(redis_url: str, tmp_path: Path) -> None:
    """Guards against a second run reusing a namespace on a shared Redis: its group ids are remembered as
    published (dedup), so its tasks would be skipped and the learner would wait forever."""
    import redis

    from common.config import ConfigError
    from deploy.launcher.dashboard import Dashboard
    from deploy.launcher.up import Launcher

    cfg = load_config(UpConfig, CONFIG, ["--redis.url", redis_url, "--run_dir", str(tmp_path / "run")])
    launcher = Launcher(cfg, Dashboard(RunDir.at(tmp_path / "run"), "off"))
    launcher.start_redis()  # a clean database: fine
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.set("longtrace:{debug-rl}:dedup:tasks:x", "1")
    client.close()
    with pytest.raises(ConfigError, match="already holds run 'debug-rl'"):
        launcher.start_redis()


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return f"<gone {p.pid}>"


def _is_rank(p: psutil.Process) -> bool:
    cmd = _cmd(p)
    return "learner.train_cli" in cmd and "torch.distributed.run" not in cmd


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
