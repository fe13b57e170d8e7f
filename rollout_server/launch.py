"""`longtrace engine launch`: start one engine (built-in or SGLang), register it in the engine registry with
heartbeats while it lives, deregister it and stop it on exit.

`--backend builtin` runs `longtrace engine serve` (the CPU/GPU transformers engine); `--backend sglang` runs
`python -m sglang.launch_server` for GPU nodes. `--dry_run` prints the command line and exits, so CI can check
it without SGLang installed. Workers find the engine through the registry as soon as it answers /health, and
forget it within `heartbeat_ttl_s` after it dies (the launcher exits with the engine's code when it does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Literal

import httpx
from pydantic import Field, model_validator

from broker.base import EngineInfo
from broker.settings import BrokerConfig
from common.config import BaseConfig
from common.net import free_port
from weights.version import INITIAL_POLICY_VERSION, SGLANG_DEFAULT, WeightVersionError, parse_weight_version

log = logging.getLogger(__name__)


class LaunchConfig(BaseConfig):
    backend: Literal["builtin", "sglang"] = "builtin"
    """builtin: `longtrace engine serve`; sglang: `python -m sglang.launch_server` (GPU nodes)."""
    broker: BrokerConfig = Field(default_factory=lambda: BrokerConfig.model_validate({}))
    """The Redis and run whose engine registry the engine joins."""
    model_path: str = ""
    """HF model directory (or hub id for SGLang)."""
    host: str = "127.0.0.1"
    """Address the engine binds to."""
    port: int = Field(default=30000, ge=0, le=65535)
    """Engine HTTP port; 0 picks a free one."""
    tp_size: int = Field(default=1, ge=1)
    """Tensor-parallel size (SGLang --tp-size); also the ranks the engine adds to the weight-update group."""
    mem_fraction_static: float = Field(default=0.7, gt=0, le=1)
    """SGLang --mem-fraction-static: GPU memory for weights and KV cache."""
    context_length: int = Field(default=0, ge=0)
    """Longest prompt + response; 0 keeps the model's (SGLang --context-length)."""
    weight_version: str = SGLANG_DEFAULT
    """Initial weight version the engine reports (SGLang --weight-version): "default" (its start-up weights, policy
    version 0) or the policy version of the weights it starts from, e.g. "7" for an export's v00000007."""
    extra_args: list[str] = []
    """More arguments appended to the server's command line as they are."""
    sglang_python: str = "python"
    """Python interpreter of the SGLang installation (it usually lives in its own CUDA venv)."""
    engine_id: str = ""
    """Registry id; empty: <backend>@<advertised host>:<port>."""
    advertise_url: str = ""
    """URL workers use to reach the engine; empty: http://<host>:<port> (the hostname when bound to 0.0.0.0)."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    """Seconds between registry heartbeats."""
    heartbeat_ttl_s: float = Field(default=10.0, gt=0)
    """The registry forgets the engine this long after its last heartbeat (e.g. the launcher was SIGKILLed)."""
    startup_timeout_s: float = Field(default=900.0, gt=0)
    """How long the engine may take to answer /health before the launch fails."""
    health_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of one /health probe during startup."""
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    """After SIGTERM, how long the engine may take to exit before it is killed."""
    export_dir: str = ""
    """The learner's HF export directory (weight_sync `export_dir`). When set, the engine loads the newest export
    before it is registered, so an engine that joins between updates never serves stale weights."""
    dry_run: bool = False
    """Print the engine's command line and exit."""

    @model_validator(mode="after")
    def _check(self) -> LaunchConfig:
        if self.backend == "sglang" and not self.model_path:
            raise ValueError("--model_path is required with --backend sglang")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("--heartbeat_ttl_s must exceed --heartbeat_interval_s, or live engines would expire")
        self.policy_version()  # the registry needs it as a policy version: refuse a string that names none
        return self

    def policy_version(self) -> int:
        """The policy version `weight_version` names (weights/version.py), registered until a catch-up moves it."""
        try:
            return parse_weight_version(self.weight_version, INITIAL_POLICY_VERSION)
        except WeightVersionError as e:
            raise ValueError(f"--weight_version: {e}") from None


def engine_command(cfg: LaunchConfig, port: int) -> list[str]:
    """The engine's command line for `cfg`, serving on `port`."""
    if cfg.backend == "sglang":
        cmd = [cfg.sglang_python, "-m", "sglang.launch_server", "--model-path", cfg.model_path]
        cmd += ["--host", cfg.host, "--port", str(port), "--tp-size", str(cfg.tp_size)]
        cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        if cfg.context_length:
            cmd += ["--context-length", str(cfg.context_length)]
        if cfg.weight_version != SGLANG_DEFAULT:
            cmd += ["--weight-version", cfg.weight_version]
        return cmd + cfg.extra_args
    # --model/--host/--port are plain flags of `engine serve`; its other keys are TOML-parsed overrides, so
    # string values are quoted there (a version like "7" must stay a string).
    cmd = [sys.executable, "-m", "deploy.cli", "engine", "serve", "--host", cfg.host, "--port", str(port)]
    if cfg.model_path:
        cmd += ["--model", cfg.model_path]
    if cfg.context_length:
        cmd += ["--context_length", str(cfg.context_length)]
    if cfg.weight_version != SGLANG_DEFAULT:
        cmd += ["--weight_version", json.dumps(cfg.weight_version)]
    return cmd + cfg.extra_args


def advertised_url(cfg: LaunchConfig, port: int) -> str:
    if cfg.advertise_url:
        return cfg.advertise_url.rstrip("/")
    host = socket.gethostname() if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{port}"


class _Stop:
    """Set by SIGTERM/SIGINT; the heartbeat loop waits on it."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        log.info("launcher got signal %d: stopping the engine", signum)
        self.event.set()


def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    probe_timeout_s: float,
    stop: threading.Event | None = None,
) -> bool:
    """Poll `url`/health until it answers 200; False if `proc` exits, `stop` is set or `timeout_s` passes."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=probe_timeout_s, trust_env=False) as http:
        while time.monotonic() < deadline and proc.poll() is None and not stop.is_set():
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass  # not listening yet
            stop.wait(0.25)
    return False


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM the engine's process group (SGLang has scheduler children), SIGKILL it after `timeout_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("engine did not exit within %.0fs: killing it", timeout_s)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):  # children it left behind (SGLang's schedulers), if any
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def launch(cfg: LaunchConfig) -> int:
    """Run the engine until it exits or the launcher is signalled; return an exit code."""
    port = cfg.port or free_port(cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")
    cmd = engine_command(cfg, port)
    if cfg.dry_run:
        print(shlex.join(cmd))
        return 0
    from broker.factory import connect

    url = advertised_url(cfg, port)
    info = EngineInfo(
        engine_id=cfg.engine_id or f"{cfg.backend}@{url.split('://', 1)[-1]}",
        url=url,
        backend=cfg.backend,
        model=cfg.model_path,
        tp_size=cfg.tp_size,
        policy_version=cfg.policy_version(),
    )
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    broker = connect(cfg.broker)
    log.info("starting engine %s: %s", info.engine_id, shlex.join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own group: we stop it and its children together
    registered = False
    try:
        local_url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{port}"
        if not wait_healthy(local_url, proc, cfg.startup_timeout_s, cfg.health_timeout_s, stop.event):
            if stop.event.is_set():
                return 0
            log.error("engine %s did not become healthy (exit code %s)", info.engine_id, proc.poll())
            return 1
        if cfg.export_dir:
            from weights.exports import catch_up

            version = catch_up(local_url, cfg.export_dir, timeout_s=cfg.startup_timeout_s)
            if version is not None:
                info.policy_version = version
        log.info("engine %s healthy at %s; registering", info.engine_id, url)
        while proc.poll() is None and not stop.event.is_set():
            broker.engines.register(info, cfg.heartbeat_ttl_s)
            registered = True
            stop.event.wait(cfg.heartbeat_interval_s)
        if proc.poll() is not None:
            log.error("engine %s exited with code %s", info.engine_id, proc.returncode)
            return proc.returncode or 1
        return 0
    finally:
        try:
            if registered:  # first, so workers stop routing to it
                broker.engines.deregister(info.engine_id)
        finally:  # even when Redis is gone: never leave the engine running without its launcher
            code = terminate(proc, cfg.shutdown_timeout_s)
            log.info("engine %s stopped (code %s)", info.engine_id, code)
            broker.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":  # `python -m rollout_server.launch ARGS`: `longtrace engine launch ARGS`
    from common.cli import run_command
    from rollout_server.cli import register

    run_command(register, ["engine", "launch"])
