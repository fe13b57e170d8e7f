"""`longtrace bench chaos` (experiments/chaos.py) and the supervisor's kill/respawn it relies on.

The CI-sized chaos run kills a reward worker, a rollout worker, Redis and an engine of the tiny local system
(configs/bench/chaos.toml, fewer steps) and asserts the accounting; the full bench (`longtrace bench chaos
--json`, all five faults including the learner) is run by hand and its figures are in docs/reliability.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from common.config import ConfigError
from common.supervisor import LogReady, ProcessSpec, Supervisor
from experiments.chaos import load_chaos_config, run_chaos
from experiments.chaos_cli import DEFAULT_CONFIG

PY = sys.executable


def test_kill_and_respawn_keep_the_child_and_read_only_the_new_log(tmp_path: Path) -> None:
    """Guards against a respawn the launcher does not follow (a new Child object would leave the phase's stop
    list and `wait` on the dead one), a kill that leaves the child's own-session descendants running, and a
    respawned child counted ready on its previous run's log line."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    with Supervisor(tmp_path / "logs", poll_s=0.05) as sup:
        child = sup.start(ProcessSpec("svc", [PY, "-c", script], ready=LogReady(r"^ready"), ready_timeout_s=30))
        deadline = time.monotonic() + 10
        while len(child.known) < 1 and time.monotonic() < deadline:
            sup.check()
            time.sleep(0.1)
        grandchild = next(iter(child.known.values()))
        first_pid = child.pid
        assert sup.kill(child) == -9
        assert not grandchild.is_running() or grandchild.status() == "zombie"
        slow = "import time; time.sleep(1.5); print('ready', flush=True); time.sleep(60)"
        t0 = time.monotonic()
        again = sup.respawn(child, ProcessSpec("svc", [PY, "-c", slow], ready=LogReady(r"^ready"), ready_timeout_s=30))
        assert again is child and child.pid != first_pid and child.restarts == 1
        assert time.monotonic() - t0 > 1.0  # waited for the new run's line, not the old one
        assert child.read_log().splitlines().count("ready") == 1  # this run's line only
        sup.check()  # the killed run is not reported as a failure
        assert sup.running() == [child]
    assert child.returncode is not None


def test_config_errors_name_the_flag(tmp_path: Path) -> None:
    """Guards against a chaos config that cannot work failing mid-run instead of at load: an unknown fault, too
    few steps for the faults, a Redis fault without the embedded Redis's AOF."""
    base = ["--up.run_dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match="faults"):
        load_chaos_config(DEFAULT_CONFIG, [*base, "--faults", '["disk"]'])
    with pytest.raises(ConfigError, match="up.phases.rl.steps 5"):
        load_chaos_config(DEFAULT_CONFIG, [*base, "--up.phases.rl.steps", "5"])
    with pytest.raises(ConfigError, match="appendonly"):
        load_chaos_config(DEFAULT_CONFIG, [*base, "--up.redis.appendonly", "false"])


@pytest.mark.slow
def test_cheap_faults_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """Guards against the delivery guarantees failing under kill -9: a group lost with a killed reward or rollout
    worker or with a Redis crash (AOF), a group trained twice after redelivery, entries left pending in a dead
    consumer, a respawned engine that never catches up to the newest weights, or a run that does not finish."""
    cfg = load_chaos_config(
        DEFAULT_CONFIG,
        [
            "--up.run_dir", str(tmp_path / "run"),
            "--faults", '["reward_worker", "rollout_worker", "redis", "engine"]',
            "--warmup_steps", "1",
            "--steps_between_faults", "1",
            "--up.phases.rl.steps", "70",  # the engine, last, restarts in 20-40 s while the learner steps on
            "--up.prepare.num_train", "64",
        ],
    )  # fmt: skip
    result = run_chaos(cfg)
    assert result["error"] == ""
    assert [f["fault"] for f in result["faults"]] == ["reward_worker", "rollout_worker", "redis", "engine"]
    assert all(f["recovery_s"] is not None for f in result["faults"]), result["faults"]
    assert result["faults"][-1]["caught_up_s"] is not None
    assert (result["groups_lost"], result["groups_duplicated"], result["groups_pending_end"]) == (0, 0, 0), result
    assert result["groups_trained"] == result["groups_expected"] == 70 * 2
    assert result["groups_admitted"] >= result["groups_trained"]
    assert result["entries_left"] == {"tasks": 0, "rollouts": 0, "scored": 0, "dead": 0}
    assert result["consumers_holding_entries"] == {}
    assert result["finished"] and result["policy_version"] == 70
    assert result["engine_versions"] == [70, 70]  # the respawned engine too
    assert result["ok"]
