"""Run the engine's HTTP server: `serve` for `longtrace engine serve`, `BackgroundServer` for in-process use (bench, tests)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from types import TracebackType
from typing import Any

from broker.base import EngineInfo
from common.exposure import check_exposure
from rollout_server.engine.config import UNAUTHENTICATED_RISK, EngineConfig
from rollout_server.engine.registry import Heartbeat
from weights.version import INITIAL_POLICY_VERSION, parse_weight_version

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(config: EngineConfig) -> None:
    """Load the model, start the scheduler, register (if a broker is configured) and serve until SIGINT/SIGTERM.
    A non-loopback `host` without a token is refused (common/exposure.py) before anything loads."""
    import uvicorn

    from rollout_server.engine.api import build_app
    from rollout_server.engine.engine import Engine

    token = config.api_key()  # a bad --api_key_file fails before the model loads
    check_exposure(
        config.host,
        token is not None,
        config.allow_unauthenticated,
        "the engine",
        f"in the env var {config.api_key_env} (--api_key_env) or a file named by --api_key_file",
        risk=UNAUTHENTICATED_RISK,
    )
    port = config.port or free_port(config.host)
    engine = Engine(config)
    engine.start()
    app = build_app(engine)
    heartbeat: Heartbeat | None = None
    broker: Any = None
    try:
        if config.broker is not None:
            from broker.factory import connect

            broker = connect(config.broker)
            broker.attach_run("engine registry")
            url = config.advertise_url or f"http://{config.host}:{port}"
            engine_id = config.engine_id or f"{config.host}:{port}"

            def info() -> EngineInfo:
                return EngineInfo(
                    engine_id=engine_id,
                    url=url,
                    backend="builtin",
                    model=engine.served_model_name,
                    tp_size=1,
                    policy_version=parse_weight_version(engine.weight_version, INITIAL_POLICY_VERSION),
                )

            heartbeat = Heartbeat(broker.engines, info, config.heartbeat_interval_s, config.heartbeat_ttl_s)
            heartbeat.start()
        # The whole config at debug level: it names where the token comes from (api_key_env/_file), never the token.
        log.debug("engine config: %s", config.model_dump_json())
        log.info("engine serving %s on http://%s:%d", config.model_path, config.host, port)
        # uvicorn re-raises the signal it shut down on; a handler (instead of the default, which kills the
        # process) lets SIGTERM end in the cleanup below: deregister, close the broker, stop the scheduler.
        signal.signal(signal.SIGTERM, lambda sig, frame: log.info("SIGTERM: engine shutting down"))
        uvicorn.run(app, host=config.host, port=port, log_level=config.log_level.lower(), timeout_graceful_shutdown=5)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if broker is not None:
            broker.close()
        engine.shutdown()


class BackgroundServer:
    """uvicorn serving `app` on a daemon thread (a free port unless given); `url` is set once it listens."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, name="engine-http", daemon=True)
        self._start_timeout_s = start_timeout_s

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
