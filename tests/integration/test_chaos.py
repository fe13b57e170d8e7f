"""`longtrace bench chaos` (experiments/chaos.py) and the supervisor's kill/respawn it relies on.

The CI-sized chaos runs kill a reward worker, a rollout worker, Redis, an engine and the learner of the tiny local
system (configs/bench/chaos.toml, fewer steps), and run the rejected-task and long-generation scenarios; each
asserts the independent accounting. The full bench (`longtrace bench chaos --json`, every scenario) is run by hand
and its figures are in docs/reliability.md.
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
    with pytest.raises(ConfigError, match="scenarios"):
        load_chaos_config(DEFAULT_CONFIG, [*base, "--scenarios", '["kills", "kills"]'])
    with pytest.raises(ConfigError, match="scenarios"):
        load_chaos_config(DEFAULT_CONFIG, [*base, "--scenarios", '["disk_full"]'])


@pytest.mark.slow
def test_kills_of_every_process_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """Guards against the delivery guarantees failing under kill -9: a group lost with a killed reward or rollout
    worker, with a Redis crash (AOF) or with the learner (steps after its checkpoint retrained), a group trained
    twice after redelivery or retraining (counted from metrics.jsonl, not from the learner's dedup record), entries
    left pending in a dead consumer, a respawned engine that never catches up to the newest weights, or a run that
    does not finish."""
    cfg = load_chaos_config(
        DEFAULT_CONFIG,
        [
            "--up.run_dir", str(tmp_path / "run"),
            "--scenarios", '["kills"]',
            "--faults", '["reward_worker", "rollout_worker", "redis", "learner", "engine"]',
            "--warmup_steps", "1",
            "--steps_between_faults", "1",
            "--up.phases.rl.steps", "80",  # the engine, last, restarts in 20-40 s while the learner steps on
            "--up.prepare.num_train", "64",
        ],
    )  # fmt: skip
    out = run_chaos(cfg)
    run = out["runs"]["kills"]
    assert out["ok"], out["failed"]
    assert [f["fault"] for f in run["faults"]] == ["reward_worker", "rollout_worker", "redis", "learner", "engine"]
    assert all(f["recovery_s"] is not None for f in run["faults"]), run["faults"]
    assert run["faults"][-1]["caught_up_s"] is not None
    assert out["scenarios"] == ["kills"] and out["kills"] == 5 and out["duplicates_counted_from"] == "metrics"
    assert (out["groups_lost"], out["groups_duplicated"]) == (0, 0) and out["conservation_ok"], run
    assert run["steps_retrained"] > 0  # the learner kill made it retrain steps after its checkpoint
    assert out["groups_trained"] == 80 * 2
    assert out["groups_admitted"] == (
        out["groups_trained"] + out["groups_dropped_stale"] + out["groups_dropped_zero_variance"]
        + out["groups_dead_lettered"] + out["groups_pending_end"]
    )  # fmt: skip
    assert run["consumers_holding_entries"] == {}
    assert out["finished"] and run["policy_version"] == 80
    assert run["engine_versions"] == [80, 80]  # the respawned engine too


@pytest.mark.slow
def test_rejected_tasks_release_their_slots_and_long_generations_keep_their_leases(tmp_path: Path) -> None:
    """Guards against issue 19's defects 1-3 end to end: tasks the engines reject (400) must be dead-lettered by the
    rollout worker and their admission slots released by the learner, so the run finishes; with two rollout workers
    and generations longer than the task lease, the holder must renew its leases before they expire, so no task is
    claimed from a live worker and generated twice."""
    cfg = load_chaos_config(
        DEFAULT_CONFIG,
        ["--up.run_dir", str(tmp_path / "run"), "--scenarios", '["reject_task", "long_generations"]',
         "--scenario_steps", "12", "--up.prepare.num_train", "64"],
    )  # fmt: skip
    out = run_chaos(cfg)
    assert out["ok"], out["failed"]
    reject, long = out["runs"]["reject_task"], out["runs"]["long_generations"]
    assert reject["tasks_poisoned"] > 0 and reject["poisoned_dead_lettered"] == reject["tasks_poisoned"]
    assert reject["groups_released_by_cause"].get("rollout", 0) > 0 and reject["finished"]
    assert long["groups_longer_than_lease"] > 0 and long["rollout_workers"] == 2
    assert (long["tasks_claimed_from_a_live_worker"], long["groups_generated_twice"]) == (0, 0)
    assert (out["groups_lost"], out["groups_duplicated"], out["conservation_ok"]) == (0, 0, True)
