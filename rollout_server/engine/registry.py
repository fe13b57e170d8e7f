"""Keeps an engine in the broker's engine registry: a heartbeat thread that re-registers it, and deregistration on exit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from broker.base import BrokerError, EngineInfo, EngineRegistry

log = logging.getLogger(__name__)


def version_number(weight_version: str) -> int:
    """The registry stores an int policy version; SGLang's weight_version is a string ("default" -> -1)."""
    return int(weight_version) if weight_version.lstrip("-").isdigit() else -1


class Heartbeat:
    """Registers `info()` every `interval_s` with a ttl; a missed beat is logged and retried next interval."""

    def __init__(
        self, registry: EngineRegistry, info: Callable[[], EngineInfo], interval_s: float, ttl_s: float
    ) -> None:
        if ttl_s <= interval_s:
            raise ValueError(f"--heartbeat_ttl_s ({ttl_s}) must exceed --heartbeat_interval_s ({interval_s})")
        self.registry = registry
        self.info = info
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine_id = info().engine_id

    def start(self) -> None:
        self.registry.register(self.info(), self.ttl_s)  # fail fast if the broker is unreachable at start
        log.info("registered engine %s in the engine registry", self.engine_id)
        self._thread = threading.Thread(target=self._run, name="engine-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.registry.register(self.info(), self.ttl_s)
            except BrokerError as e:  # the broker retried and gave up; the next beat tries again
                log.warning("engine heartbeat failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5.0)
        self.registry.deregister(self.engine_id)
        log.info("deregistered engine %s", self.engine_id)
