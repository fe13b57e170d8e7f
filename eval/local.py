"""`longtrace eval --model DIR`: a local built-in engine and reward API as child processes for one eval.

Whichever of `engine_urls` / `reward_url` is empty is started here (`longtrace engine serve`, `longtrace reward
serve`, on free loopback ports) under the launcher's Supervisor: both start in parallel, the eval begins once
both answer /health, and they are stopped (SIGTERM, then SIGKILL after a deadline) when it ends, fails or is
interrupted. Their logs go to OUT_DIR/logs/.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from common.supervisor import Child, HttpReady, ProcessSpec, Supervisor
from eval.config import EvalConfig

_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Services:
    engine_urls: list[str]
    reward_url: str
    supervisor: Supervisor | None
    """Set when something was started here: `check()` raises ChildFailed (with its log tail) if it died."""
    started: list[Child] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.supervisor is not None

    def wait_ready(self) -> None:
        """Block until every local service answers /health; ChildFailed (with its log tail) if one dies first."""
        if self.supervisor is not None:
            for child in self.started:
                self.supervisor.wait_ready(child)


def _engine_spec(cfg: EvalConfig, port: int) -> ProcessSpec:
    lc = cfg.local
    argv = [
        sys.executable, "-m", "deploy.cli", "engine", "serve",
        "--model", cfg.model_path, "--port", str(port),
        "--max_running_requests", str(lc.max_running_requests),
        "--context_length", str(lc.context_length),
        "--num_threads", str(lc.num_threads),
        "--device", lc.device,
    ]  # fmt: skip
    env = dict(_ENV)
    if lc.num_threads:
        env |= {"OMP_NUM_THREADS": str(lc.num_threads), "MKL_NUM_THREADS": str(lc.num_threads)}
    return ProcessSpec(
        "eval-engine",
        argv,
        env,
        ready=HttpReady(f"http://127.0.0.1:{port}/health"),
        ready_timeout_s=lc.startup_timeout_s,
        stop_timeout_s=20.0,
    )


def _reward_spec(cfg: EvalConfig, port: int) -> ProcessSpec:
    argv = [sys.executable, "-m", "deploy.cli", "reward", "serve", "--port", str(port), "--host", "127.0.0.1"]
    if cfg.local.reward_config:
        if not Path(cfg.local.reward_config).is_file():
            raise ValueError(f"--local.reward_config: no such file {cfg.local.reward_config!r}")
        argv += ["--config", cfg.local.reward_config]
    return ProcessSpec(
        "eval-reward",
        argv,
        dict(_ENV),
        ready=HttpReady(f"http://127.0.0.1:{port}/health"),
        ready_timeout_s=cfg.local.startup_timeout_s,
        stop_timeout_s=15.0,
    )


@contextmanager
def services(cfg: EvalConfig, log_dir: Path) -> Iterator[Services]:
    """The engine and reward URLs to evaluate with, starting (and finally stopping) the missing ones locally.
    They are started, not yet ready: call `wait_ready()` (the caller loads its inputs meanwhile)."""
    if cfg.engine_urls and cfg.reward_url:
        yield Services(list(cfg.engine_urls), cfg.reward_url, None)
        return
    from common.net import free_port

    assert cfg.model_path, "EvalConfig requires --model when a URL is missing"
    with Supervisor(log_dir) as sup:
        engine_urls, reward_url = list(cfg.engine_urls), cfg.reward_url
        started = []
        if not engine_urls:
            port = free_port()
            started.append(sup.start(_engine_spec(cfg, port), wait_ready=False))
            engine_urls = [f"http://127.0.0.1:{port}"]
        if not reward_url:
            port = free_port()
            started.append(sup.start(_reward_spec(cfg, port), wait_ready=False))
            reward_url = f"http://127.0.0.1:{port}"
        yield Services(engine_urls, reward_url, sup, started)
