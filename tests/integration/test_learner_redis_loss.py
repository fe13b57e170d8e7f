"""The learner (2 torchrun gloo ranks, the learner CLI) on an embedded Redis that restarts without its append-only
file: the running learner and the resumed one stop with an error naming the Redis and the lost run, instead of
training on an empty run (the feeder's admitted groups gone, the learner waiting `batch_timeout_s` for them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from broker.embedded import EmbeddedRedis
from learner.metrics import read_metrics
from tests.helpers.dist import REPO_ROOT, free_port
from tests.helpers.scored_driver import ScoredDriver

RUN_ID = "lost-run"


def _config(tmp: Path, redis_url: str) -> Path:
    from datagen.dataset import make_row, write_rows
    from rollout_server.models import init_tiny_model

    hf = init_tiny_model(tmp / "hf", hidden_size=64, num_layers=2, vocab_size=300, num_heads=4, num_kv_heads=2)
    rows = [make_row(f"Documents: doc {i}. Question {i}?", f"a{i}", f"q{i}", [f"e{i}"], "longqa") for i in range(5)]
    write_rows(tmp / "data.jsonl", rows)
    config = tmp / "learner.toml"
    config.write_text(
        f"""run_dir = "{tmp / "run"}"
max_steps = 6
[model]
hf_path = "{hf}"
dist_timeout_s = 120
[broker]
redis_url = "{redis_url}"
run_id = "{RUN_ID}"
[data]
dataset_path = "{tmp / "data.jsonl"}"
groups_per_step = 2
num_samples = 4
max_staleness = 1
max_new_tokens = 8
max_total_tokens = 4096
[batch]
max_tokens_per_micro_batch = 128
read_block_s = 0.2
[checkpoint]
interval_steps = 2
"""
    )
    return config


def _launch(config: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "--rdzv_backend=static", "-m", "learner.train_cli", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _exit_code(proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in victims:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
        raise AssertionError(f"the learner kept running on the emptied Redis:\n{log.read_text()[-4000:]}") from None


def test_learner_stops_when_redis_restarts_without_its_data_and_will_not_resume_on_it(tmp_path: Path) -> None:
    """Guards against a Redis restarted without its append-only file being taken for an empty run: the running
    learner carried on (its reads found nothing, it waited hours for the groups it had admitted) and a restarted
    one resumed from its checkpoint on the empty Redis. Both now stop with RunDataLost naming the Redis URL."""
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=False).start()
    config = _config(tmp_path, server.url)
    driver = ScoredDriver(server.url, RUN_ID, limit=3 * 2)  # 3 steps of groups, then the learner waits for more
    driver.start()
    try:
        first = _launch(config, tmp_path / "run1.log")
        deadline = time.monotonic() + 300
        while len(read_metrics(tmp_path / "run")) < 3:
            assert first.poll() is None, (tmp_path / "run1.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "run1.log").read_text()[-4000:]
            time.sleep(0.2)
        server.stop()  # redis-server restarts, without an append-only file to reload: empty
        server.start()
        assert _exit_code(first, tmp_path / "run1.log", 120) != 0
        log = (tmp_path / "run1.log").read_text()
        assert "RunDataLost" in log and f"127.0.0.1:{server.port}" in log and "no marker" in log, log[-4000:]
        assert f"run '{RUN_ID}' started at" in log and "by learner" in log, log[-4000:]

        second = _launch(config, tmp_path / "run2.log")  # resumes from its checkpoint at step 2
        assert _exit_code(second, tmp_path / "run2.log", 300) != 0
        log = (tmp_path / "run2.log").read_text()
        assert "RunDataLost" in log and "checkpoint at step 2 says it started before" in log, log[-4000:]
    finally:
        driver.close()
        server.cleanup()
