"""How `longtrace up` starts each child: its command line, environment, readiness check and stop grace.

The launcher (deploy/launcher/up.py) decides when each child runs and writes its config file; these functions
say how it is run. Every child reads its config from a file (`--config PATH`), never from argv flags, and gets
the Redis password, if any, in its environment (up.py adds it), so neither shows up in `ps`.
"""

from __future__ import annotations

import sys

from common.supervisor import HttpReady, LogReady, ProcessSpec, RedisReady
from rollout_server.engine.config import HEALTH_GENERATION_ENV

PY = sys.executable
CHILD_ENV = {
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def threads_env(n: int) -> dict[str, str]:
    return {**CHILD_ENV, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def prepare(config_path: str, data_dir: str, model_dir: str) -> ProcessSpec:
    argv = [PY, "-m", "deploy.launcher.prepare", "--config", config_path, "--data-dir", data_dir]
    return ProcessSpec("prepare", [*argv, "--model-dir", model_dir], CHILD_ENV, job=True)


def redis(port: int, data_dir: str, appendonly: bool, appendfsync: str, ready_timeout_s: float) -> ProcessSpec:
    """The embedded Redis on `port`. The fsync policy is given at its start, not by CONFIG SET later: a write
    acknowledged in between could be lost, and a restart (the chaos bench's Redis fault) starts from this argv."""
    argv = [PY, "-m", "deploy.cli", "redis", "--port", str(port), "--dir", data_dir]
    argv += ["--appendonly" if appendonly else "--no-appendonly", "--appendfsync", appendfsync]
    ready = RedisReady(f"redis://127.0.0.1:{port}/0")
    return ProcessSpec("redis", argv, CHILD_ENV, ready=ready, ready_timeout_s=ready_timeout_s)


def reward_api(config_path: str, url: str, env: dict[str, str], ready_timeout_s: float) -> ProcessSpec:
    return ProcessSpec(
        "reward-api",
        [PY, "-m", "deploy.cli", "reward", "serve", "--config", config_path],
        env,
        ready=HttpReady(f"{url}/health"),
        ready_timeout_s=ready_timeout_s,
        stop_timeout_s=15.0,
    )


def engine(name: str, config_path: str, url: str, env: dict[str, str], ready_timeout_s: float) -> ProcessSpec:
    """The built-in engine, with SGLang's generation-based `/health` off (as slime launches SGLang): with it on,
    a paused engine answers `/health` 503, and every probe during a weight push would call it dead."""
    return ProcessSpec(
        name,
        [PY, "-m", "deploy.cli", "engine", "serve", "--config", config_path],
        {**env, HEALTH_GENERATION_ENV: "0"},
        ready=HttpReady(f"{url}/health"),
        ready_timeout_s=ready_timeout_s,
        stop_timeout_s=20.0,
    )


def reward_worker(
    name: str, config_path: str, env: dict[str, str], ready_timeout_s: float, stop_timeout_s: float
) -> ProcessSpec:
    """Ready once it consumes its stream (it has connected and created its consumer group)."""
    return ProcessSpec(
        name,
        [PY, "-m", "deploy.cli", "reward", "worker", "--config", config_path],
        env,
        ready=LogReady(r"reward worker \S+ consuming"),
        ready_timeout_s=ready_timeout_s,
        stop_timeout_s=stop_timeout_s,
    )


def rollout_worker(
    name: str, config_path: str, env: dict[str, str], ready_timeout_s: float, stop_timeout_s: float
) -> ProcessSpec:
    return ProcessSpec(
        name,
        [PY, "-m", "rollout_server.worker", "--config", config_path],
        env,
        ready=LogReady(r"rollout worker \S+ reading"),
        ready_timeout_s=ready_timeout_s,
        stop_timeout_s=stop_timeout_s,
    )


def sft_source(name: str, config_path: str, env: dict[str, str]) -> ProcessSpec:
    return ProcessSpec(name, [PY, "-m", "deploy.launcher.sft_source", "--config", config_path], env, job=True)


def learner(name: str, config_path: str, nproc_per_node: int, master_port: int, env: dict[str, str]) -> ProcessSpec:
    argv = [
        PY, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc_per_node", str(nproc_per_node),
        "--master_addr", "127.0.0.1",
        "--master_port", str(master_port),
        "-m", "learner.train_cli", "--config", config_path,
    ]  # fmt: skip
    return ProcessSpec(name, argv, env, job=True, stop_timeout_s=30.0)


def evaluation(name: str, config_path: str) -> ProcessSpec:
    return ProcessSpec(name, [PY, "-m", "deploy.launcher.evaluate", "--config", config_path], CHILD_ENV, job=True)


def eval_worker(name: str, config_path: str, requests_dir: str) -> ProcessSpec:
    """The in-training eval worker of a phase (deploy/launcher/live_eval.py): one eval per request file."""
    argv = [PY, "-m", "deploy.launcher.live_eval", "--config", config_path, "--requests", requests_dir]
    return ProcessSpec(name, argv, {**CHILD_ENV, "OMP_NUM_THREADS": "1"}, stop_timeout_s=5.0)
