"""The 4-node scripts, run as 2 "nodes" x 1 rank on one machine: two `deploy/torchrun/learner.sh` invocations
meet in a c10d rendezvous (gloo on CPU) and train the tiny model for a few steps, pushing weights to an engine
started by `deploy/torchrun/engine.sh`, which registered itself in Redis (the only shared service).

The rollout and reward services are outside this test: a driver thread turns each task into a scored group
(tests/helpers/scored_driver.py, with both rewards in every group so advantages are non-zero). What runs for
real is exactly what a cluster runs: the scripts, torchrun's c10d rendezvous with node 0 hosting the store, the
learner CLI with the scripts' overrides, the engine launcher and registry, and weight sync to the registered
engine at the address learner.sh passes (NODE_ADDR).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from broker.factory import connect
from broker.settings import BrokerConfig
from tests.helpers.dist import REPO_ROOT, free_port
from tests.helpers.scored_driver import ScoredDriver

RUN_ID = "multinode-test"
STEPS = 3
TORCHRUN = REPO_ROOT / "deploy" / "torchrun"


def _write_inputs(tmp: Path) -> tuple[Path, Path]:
    from datagen.dataset import make_row, write_rows
    from rollout_server.models import init_tiny_model

    init_tiny_model(tmp / "hf", hidden_size=64, num_layers=2, vocab_size=300, num_heads=4, num_kv_heads=2)
    rows = [make_row(f"Documents: doc {i}. Question {i}?", f"a{i}", f"q{i}", [f"e{i}"], "longqa") for i in range(8)]
    write_rows(tmp / "data.jsonl", rows)
    learner = tmp / "learner.toml"
    # The scripts add the cluster's settings (Redis, run id, model, data, run dir, exports, this node's address).
    learner.write_text(
        f"""max_steps = {STEPS}
[model]
dist_timeout_s = 300  # above a push attempt's bound: 2 x 60 + 15 + 60 + (60 + 30) + 5 = 290 s
[data]
groups_per_step = 2
num_samples = 2
max_staleness = 1
max_new_tokens = 8
max_total_tokens = 2048
[batch]
max_tokens_per_micro_batch = 128
read_block_s = 0.2
[optim]
lr = 1e-3
[checkpoint]
interval_steps = {STEPS}
[weight_sync]
type = "distributed"
backend = "gloo"
use_registry = true
init_timeout_s = 60
broadcast_timeout_s = 60
"""
    )
    engine = tmp / "engine.toml"
    engine.write_text('backend = "builtin"\nheartbeat_interval_s = 0.5\nheartbeat_ttl_s = 5\n')
    return learner, engine


def _start(script: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", str(TORCHRUN / script)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait(predicate: object, procs: dict[str, tuple[subprocess.Popen[bytes], Path]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        for name, (proc, log) in procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "timed out:\n" + "\n".join(
            f"--- {name}\n{log.read_text()[-2000:]}" for name, (_, log) in procs.items()
        )
        time.sleep(0.2)


def test_two_learner_nodes_rendezvous_train_and_push_weights_to_a_registered_engine(
    tmp_path: Path, redis_url: str
) -> None:
    """Guards against the multi-node recipe failing where a single-node run cannot show it: c10d rendezvous flags
    (two agents on one endpoint, node 0 hosting the store), the scripts' overrides of the learner config, the
    engine launcher registering an address the learner can reach, and the weight-sync group across nodes."""
    learner_toml, engine_toml = _write_inputs(tmp_path)
    engine_port = free_port()
    env = {
        **os.environ,
        "LT_ENV_FILE": "/nonexistent",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "REDIS_URL": redis_url,
        "RUN_ID": RUN_ID,
        "MODEL_PATH": str(tmp_path / "hf"),
        "DATA_PATH": str(tmp_path / "data.jsonl"),
        "RUN_DIR": str(tmp_path / "run"),
        "NODE_ADDR": "127.0.0.1",
        "LEARNER_CONFIG": str(learner_toml),
        "ENGINE_CONFIG": str(engine_toml),
        "ENGINE_PORT": str(engine_port),
        "ENGINE_HOST": "127.0.0.1",
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
    }
    broker = connect(BrokerConfig(redis_url=redis_url, run_id=RUN_ID))
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    driver = ScoredDriver(redis_url, RUN_ID, alternate_rewards=True)
    try:
        procs["engine"] = (_start("engine.sh", env, tmp_path / "engine.log"), tmp_path / "engine.log")
        _wait(lambda: len(broker.engines.live()) == 1, procs, timeout_s=120)
        driver.start()
        for node in (0, 1):
            log = tmp_path / f"node{node}.log"
            procs[f"node{node}"] = (_start("learner.sh", env | {"NODE_RANK": str(node)}, log), log)
        nodes = [procs["node0"][0], procs["node1"][0]]
        _wait(lambda: all(p.poll() is not None for p in nodes), {"engine": procs["engine"]}, timeout_s=300)
        logs = {name: log.read_text() for name, (_, log) in procs.items()}
        for node, proc in enumerate(nodes):
            assert proc.returncode == 0, f"node{node} exited {proc.returncode}:\n{logs[f'node{node}'][-4000:]}"
        version = httpx.get(f"http://127.0.0.1:{engine_port}/get_weight_version", timeout=10).json()
    finally:
        driver.close()
        for proc, _ in procs.values():
            _stop(proc)
        broker.close()

    from learner.metrics import read_metrics

    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["weight_sync/ok"] == 1.0 and m["weight_sync/num_engines"] == 1.0 for m in metrics)
    assert version["weight_version"] == str(STEPS)
    # One world of two ranks on two "nodes": data parallel over them, node 0 hosting the rendezvous store.
    assert "world_size=2" in logs["node0"] + logs["node1"] and "dp_size=2" in logs["node0"] + logs["node1"]
    assert (tmp_path / "run" / "exports" / "LATEST").is_file()  # late engines load this (RUN_DIR/exports)
