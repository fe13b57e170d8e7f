"""`python -m learner.train_cli` end to end on a real Redis and 2 torchrun gloo ranks: SIGKILL, resume, compare.

The rollout and reward services are outside this test: a driver thread (tests/helpers/scored_driver.py)
turns each task into a scored group deterministically (token ids, engine logprobs and rewards derived from
the group id), in task order, so both runs see the same data. Run 1 gets groups for 3 steps only; it
checkpoints at step 2, trains step 3, then blocks waiting for step 4 and is SIGKILLed. Run 2 resumes from
step 2 with the driver serving everything and must retrain step 3 bit for bit (same groups, same weights,
same optimizer state), train step 4 and ack everything; no group is trained twice in the final history.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from broker.base import SCORED
from broker.factory import connect
from broker.schemas import ScoredGroup
from broker.settings import BrokerConfig
from learner.feeder import epoch_order, group_id
from learner.metrics import read_metrics, trained_lineage
from learner.scored_reader import CONSUMER_GROUP
from learner.state import LearnerState
from tests.helpers.dist import REPO_ROOT, free_port
from tests.helpers.scored_driver import ScoredDriver

RUN_ID = "resume-test"
GROUPS_PER_STEP, NUM_SAMPLES = 2, 4
DETERMINISTIC = ("loss", "grad_norm", "logp_old_mean", "entropy", "is_ratio_mean", "reward_mean", "num_loss_tokens")


def _write_inputs(tmp: Path, redis_url: str) -> Path:
    from datagen.dataset import make_row, write_rows
    from rollout_server.models import init_tiny_model

    hf = init_tiny_model(tmp / "hf", hidden_size=64, num_layers=2, vocab_size=300, num_heads=4, num_kv_heads=2)
    rows = [make_row(f"Documents: doc {i}. Question {i}?", f"a{i}", f"q{i}", [f"e{i}"], "longqa") for i in range(5)]
    write_rows(tmp / "data.jsonl", rows)
    config = tmp / "learner.toml"
    config.write_text(
        f"""run_dir = "{tmp / "run"}"
max_steps = 4
[model]
hf_path = "{hf}"
dist_timeout_s = 120
[broker]
redis_url = "{redis_url}"
run_id = "{RUN_ID}"
[data]
dataset_path = "{tmp / "data.jsonl"}"
groups_per_step = {GROUPS_PER_STEP}
num_samples = {NUM_SAMPLES}
max_staleness = 1
max_new_tokens = 8
max_total_tokens = 4096
[batch]
max_tokens_per_micro_batch = 128
read_block_s = 0.2
[optim]
lr = 1e-3
[checkpoint]
interval_steps = 2
"""
    )
    return config


def _launch(config: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "--rdzv_backend=static",
        "-m",
        "learner.train_cli",
        "--config",
        str(config),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["HF_HUB_OFFLINE"] = "1"
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL torchrun and every process under it (its workers run in sessions of their own), as a node loss would."""
    import psutil

    if proc.poll() is not None:
        return
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait(30)


def _wait(predicate: Any, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"learner exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def test_sigkill_then_resume_retrains_the_same_step_and_loses_nothing(tmp_path: Path, redis_url: str) -> None:
    """Guards against a checkpoint missing optimizer state, learner state or the dataset cursor (the resumed step
    would differ), against acking scored entries before the checkpoint that covers them (they would be lost
    with the kill), against retraining or skipping groups after a resume, and against the CLI entry point,
    broadcast and checkpoint collectives not working across real ranks."""
    config = _write_inputs(tmp_path, redis_url)
    run_dir = tmp_path / "run"
    scored = connect(BrokerConfig(redis_url=redis_url, run_id=RUN_ID)).producer(SCORED, ScoredGroup)

    driver = ScoredDriver(redis_url, RUN_ID, limit=3 * GROUPS_PER_STEP)
    driver.start()
    first = _launch(config, tmp_path / "run1.log")
    try:
        _wait(lambda: len(read_metrics(run_dir)) >= 3, first, tmp_path / "run1.log", timeout_s=300)
        time.sleep(0.5)  # it is now blocked waiting for step 4's groups, which never come
        assert first.poll() is None
    finally:
        _kill_tree(first)
        driver.close()
    killed = read_metrics(run_dir)
    assert [m["step"] for m in killed] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert scored.backlog() == GROUPS_PER_STEP  # step 3's entries: trained, but not acked without a checkpoint

    driver = ScoredDriver(redis_url, RUN_ID)
    driver.start()
    second = _launch(config, tmp_path / "run2.log")
    try:
        assert second.wait(300) == 0, (tmp_path / "run2.log").read_text()[-4000:]
    finally:
        _kill_tree(second)
        driver.close()

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 3, 4]
    for key in DETERMINISTIC:
        assert metrics[3][key] == killed[2][key], key  # the resumed step 3 is the killed run's step 3
    assert metrics[4]["groups_trained"] == 4 * GROUPS_PER_STEP
    state = LearnerState.load(run_dir / "checkpoints" / "step_00000004" / "learner_state.json")
    assert state.step == 4 and state.policy_version == 4
    order = [group_id(RUN_ID, e, int(i)) for e in range(2) for i in epoch_order(5, seed=0, epoch=e, shuffle=True)]
    # metrics.jsonl, the record that survives the kill: the last line of each step is the final lineage's.
    lineage = trained_lineage(metrics)
    assert metrics[3]["trained_group_ids"] == killed[2]["trained_group_ids"]  # the retrained step 3: same groups
    trained = [g for step in sorted(lineage) for g in lineage[step]]
    assert trained == order[: 4 * GROUPS_PER_STEP]  # the feeder's order, each group once
    admitted = order[: state.cursor.admitted]
    assert set(state.admitted_unread) == set(admitted[4 * GROUPS_PER_STEP :])  # decided: exactly the trained ones
    assert state.num_duplicates == 0 and state.num_dropped_stale == 0 and state.num_dead_lettered == 0
    # Everything read was acked after the final checkpoint; what is left are groups served for step 5 and up.
    broker = connect(BrokerConfig(redis_url=redis_url, run_id=RUN_ID))
    assert broker.view(SCORED).stats().groups[CONSUMER_GROUP].pending == 0
    assert scored.backlog() == 3 * GROUPS_PER_STEP + driver.done - 4 * GROUPS_PER_STEP
    assert json.loads((run_dir / "config.json").read_text())["max_steps"] == 4


def test_early_stop_ends_on_the_loss_checkpoints_and_stays_stopped(tmp_path: Path, redis_url: str) -> None:
    """Guards against early stop ending on one rank only (the other would hang in its next collective), against
    leaving the last step without a checkpoint (the next phase and a restart would lose it), and against a restart
    training on to max_steps after training had already ended early."""
    config = _write_inputs(tmp_path, redis_url)
    # Any loss is below 1e9: the mean over a full 2-step window ends training after step 2 of 4.
    config.write_text(config.read_text() + "[early_stop]\nloss_below = 1e9\nwindow_steps = 2\n")
    run_dir = tmp_path / "run"
    driver = ScoredDriver(redis_url, RUN_ID)
    driver.start()
    try:
        for attempt in (1, 2):  # the second run resumes from the final checkpoint and must not train
            proc = _launch(config, tmp_path / f"run{attempt}.log")
            try:
                assert proc.wait(300) == 0, (tmp_path / f"run{attempt}.log").read_text()[-4000:]
            finally:
                _kill_tree(proc)
    finally:
        driver.close()
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert [m["stopped_early"] for m in metrics] == [0.0, 1.0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    state = LearnerState.load(run_dir / "checkpoints" / "step_00000002" / "learner_state.json")
    assert state.stopped_early and state.step == 2 and state.num_trained_groups == 2 * GROUPS_PER_STEP
