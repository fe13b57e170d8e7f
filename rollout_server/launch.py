"""`longtrace engine launch`: start one engine (built-in or SGLang), register it in the engine registry with
heartbeats while it lives, deregister it and stop it on exit.

`--backend builtin` runs `longtrace engine serve` (the CPU/GPU transformers engine); `--backend sglang` runs
`python -m sglang.launch_server` for GPU nodes. `--dry_run` prints the command line and exits, so CI can check
it without SGLang installed. Workers find the engine through the registry as soon as it answers /health, and
forget it within `heartbeat_ttl_s` after it dies (the launcher exits with the engine's code when it does). Every
heartbeat registers the policy version the engine serves at that moment (its `/model_info`), so the registry
follows weight pushes, and the ranks the engine adds to the weight-update group (every GPU, from its
`/server_info` once). A non-loopback `host` without a token is refused unless `--allow_unauthenticated`.
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
import tempfile
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Literal

import httpx
from pydantic import Field, model_validator

from broker.base import EngineInfo
from broker.settings import BrokerConfig
from common.config import BaseConfig
from common.exposure import check_exposure
from common.net import free_port
from rollout_server.engine.config import HEALTH_GENERATION_ENV, UNAUTHENTICATED_RISK
from rollout_server.engine.registry import Heartbeat
from weights.sglang_release import distributed_update_problem, engine_ranks
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
    """Address the engine binds to. Any but a loopback address needs a token (`api_key_env`, both backends;
    `api_key_file`, the built-in one) or `allow_unauthenticated`, or the launch is refused."""
    port: int = Field(default=30000, ge=0, le=65535)
    """Engine HTTP port; 0 picks a free one."""
    tp_size: int = Field(default=1, ge=1)
    """Tensor-parallel size (SGLang --tp-size). The ranks the engine adds to the weight-update group are read from
    the running engine (`/get_server_info`: every GPU, tp x pp x dp), so `--pp-size`/`--dp-size` in `extra_args`
    count too."""
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
    api_key_env: str = "LONGTRACE_ENGINE_API_KEY"
    """Env var holding the engines' control token: the built-in engine's (passed on as its `--api_key_env`),
    SGLang's `--admin-api-key` (handed over in a private `--config` YAML file, never on the command line, where
    every user of the machine reads it with `ps`), and the one the heartbeat sends to read `/model_info`."""
    api_key_file: str = ""
    """File holding the built-in engine's token instead (its `--api_key_file`)."""
    allow_unauthenticated: bool = False
    """Start an engine on a non-loopback `host` without a token (anyone who reaches it can pause it or replace its
    weights); without it, such a launch is refused."""
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

    def has_token(self) -> bool:
        """Whether the engine will require a token on its control endpoints."""
        if self.backend == "sglang":
            return self.token_in_args() or bool(self.env_token())
        return bool(self.api_key_file) or bool(self.env_token())

    def env_token(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def token_in_args(self) -> bool:
        """SGLang's token given on its command line in `extra_args` (works, but `ps` shows it)."""
        return any(a.split("=", 1)[0] in ("--api-key", "--admin-api-key") for a in self.extra_args)

    def policy_version(self) -> int:
        """The policy version `weight_version` names (weights/version.py); checked at load, so an engine never starts
        with a version its heartbeat could not register (the heartbeat reads the served version at every beat)."""
        try:
            return parse_weight_version(self.weight_version, INITIAL_POLICY_VERSION)
        except WeightVersionError as e:
            raise ValueError(f"--weight_version: {e}") from None


@contextlib.contextmanager
def sglang_secrets(cfg: LaunchConfig) -> Iterator[str]:
    """SGLang's `--config` file holding the token of `api_key_env` as `admin-api-key`, private to this user (0600 in a
    0700 directory) and removed when the launch ends; "" when there is none to give (the built-in engine reads the
    variable itself; a token already in `extra_args` wins). SGLang reads the file once, at start-up."""
    token = cfg.env_token()
    if cfg.backend != "sglang" or not token or cfg.token_in_args():
        yield ""
        return
    with tempfile.TemporaryDirectory(prefix="longtrace-sglang-") as tmp:
        path = os.path.join(tmp, "secrets.yaml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"admin-api-key: {json.dumps(token)}\n")  # a JSON string is a YAML double-quoted scalar
        yield path


def engine_command(cfg: LaunchConfig, port: int, secrets_file: str = "") -> list[str]:
    """The engine's command line for `cfg`, serving on `port` (SGLang: reading `secrets_file` with --config)."""
    if cfg.backend == "sglang":
        cmd = [cfg.sglang_python, "-m", "sglang.launch_server", "--model-path", cfg.model_path]
        if secrets_file:
            cmd += ["--config", secrets_file]
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
    if cfg.api_key_env != LaunchConfig.model_fields["api_key_env"].default:
        cmd += ["--api_key_env", json.dumps(cfg.api_key_env)]
    if cfg.api_key_file:
        cmd += ["--api_key_file", json.dumps(cfg.api_key_file)]
    if cfg.allow_unauthenticated:
        cmd += ["--allow_unauthenticated", "true"]
    return cmd + cfg.extra_args


def engine_env() -> dict[str, str]:
    """The engine's environment: the launcher's, with SGLang's generation-based `/health` off (as slime launches
    SGLang; the built-in engine reads the same variable). With it on, a paused engine answers `/health` 503 after
    its health timeout, so every probe during a weight push would call it dead."""
    return {**os.environ, HEALTH_GENERATION_ENV: "0"}


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


def served_policy_version(http: httpx.Client, url: str) -> int:
    """The policy version of the weights the engine at `url` serves now: its weight_version, read strictly."""
    r = http.get(f"{url}/model_info")  # SGLang 0.5.23 deprecates /get_model_info; older builds lack /model_info
    if r.status_code == 404:
        r = http.get(f"{url}/get_model_info")
    if r.status_code != 200:
        raise RuntimeError(f"{url}/model_info answered {r.status_code}: {r.text[:200]}")
    return parse_weight_version(str(r.json()["weight_version"]), INITIAL_POLICY_VERSION)


def served_ranks(http: httpx.Client, url: str) -> int:
    """The ranks the engine at `url` adds to the weight-update group (weights/sglang_release.py `engine_ranks`),
    from its `/server_info` (SGLang 0.5.23 deprecates /get_server_info; older builds lack /server_info). Logs why
    pushes over NCCL cannot reach an engine whose layout the pinned SGLang cannot join."""
    r = http.get(f"{url}/server_info")
    if r.status_code == 404:
        r = http.get(f"{url}/get_server_info")
    if r.status_code != 200:
        raise RuntimeError(f"{url}/server_info answered {r.status_code}: {r.text[:200]}")
    info = r.json()
    if problem := distributed_update_problem(info):
        log.warning("engine at %s cannot take distributed weight updates: %s", url, problem)
    return engine_ranks(info)


def launch(cfg: LaunchConfig) -> int:
    """Run the engine until it exits or the launcher is signalled; return an exit code."""
    check_exposure(  # a ConfigError (exit 2) naming --allow_unauthenticated
        cfg.host,
        cfg.has_token(),
        cfg.allow_unauthenticated,
        f"the {cfg.backend} engine",
        f"in the env var {cfg.api_key_env} (--api_key_env)"
        if cfg.backend == "sglang"
        else f"in the env var {cfg.api_key_env} (--api_key_env) or a file named by --api_key_file",
        risk=UNAUTHENTICATED_RISK,
    )
    if cfg.backend == "sglang" and cfg.token_in_args():
        log.warning(
            "the engine's token is on SGLang's command line (--extra_args), where `ps` shows it to every user of "
            "this machine: set it in the env var %s instead (handed to SGLang in a private --config file)",
            cfg.api_key_env,
        )
    port = cfg.port or free_port(cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1")
    with sglang_secrets(cfg) as secrets_file:
        return _run(cfg, port, engine_command(cfg, port, secrets_file))


def _run(cfg: LaunchConfig, port: int, cmd: list[str]) -> int:
    if cfg.dry_run:
        print(shlex.join(cmd))
        return 0
    from broker.factory import connect

    url = advertised_url(cfg, port)
    engine_id = cfg.engine_id or f"{cfg.backend}@{url.split('://', 1)[-1]}"
    local_url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{port}"
    token = cfg.env_token()
    http = httpx.Client(
        timeout=cfg.health_timeout_s, trust_env=False, headers={"Authorization": f"Bearer {token}"} if token else {}
    )

    layout: dict[str, int] = {}  # the engine's ranks: fixed once it runs, read at the first beat that succeeds

    def info() -> EngineInfo:  # read at every beat: the registry follows the weights the engine serves
        if "ranks" not in layout:
            layout["ranks"] = served_ranks(http, local_url)
        return EngineInfo(
            engine_id=engine_id,
            url=url,
            backend=cfg.backend,
            model=cfg.model_path,
            tp_size=layout["ranks"],
            policy_version=served_policy_version(http, local_url),
        )

    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    broker = connect(cfg.broker)
    log.info("starting engine %s: %s", engine_id, shlex.join(cmd))
    # its own group: we stop it and its children together
    proc = subprocess.Popen(cmd, env=engine_env(), start_new_session=True)
    heartbeat: Heartbeat | None = None
    try:
        if not wait_healthy(local_url, proc, cfg.startup_timeout_s, cfg.health_timeout_s, stop.event):
            if stop.event.is_set():
                return 0
            log.error("engine %s did not become healthy (exit code %s)", engine_id, proc.poll())
            return 1
        if cfg.export_dir:
            from weights.exports import catch_up

            catch_up(local_url, cfg.export_dir, timeout_s=cfg.startup_timeout_s, token_env=cfg.api_key_env)
        log.info("engine %s healthy at %s; registering", engine_id, url)
        heartbeat = Heartbeat(broker.engines, info, cfg.heartbeat_interval_s, cfg.heartbeat_ttl_s)
        heartbeat.start()
        while proc.poll() is None and not stop.event.is_set():
            stop.event.wait(cfg.heartbeat_interval_s)
        if proc.poll() is not None:
            log.error("engine %s exited with code %s", engine_id, proc.returncode)
            return proc.returncode or 1
        return 0
    finally:
        try:
            if heartbeat is not None:  # first, so workers stop routing to it
                heartbeat.stop()
        finally:  # even when Redis is gone: never leave the engine running without its launcher
            code = terminate(proc, cfg.shutdown_timeout_s)
            log.info("engine %s stopped (code %s)", engine_id, code)
            http.close()
            broker.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":  # `python -m rollout_server.launch ARGS`: `longtrace engine launch ARGS`
    from common.cli import run_command
    from rollout_server.cli import register

    run_command(register, ["engine", "launch"])
