"""Keeps an engine in the broker's engine registry: a heartbeat thread that re-registers it, and deregistration on exit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from broker.base import EngineInfo, EngineRegistry

log = logging.getLogger(__name__)


class Heartbeat:
    """Registers `info()` every `interval_s` with a ttl; a missed beat is logged and retried next interval.

    The thread outlives any error of one beat (the broker gave up, or `info()` failed: an engine whose
    weight_version was set to a string that names no policy version): a dead heartbeat would silently drop a
    live engine from the registry. A beat that fails is skipped, so such an engine leaves the registry after
    `ttl_s` and rejoins with the first beat that succeeds again."""

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
        last_error = ""
        while not self._stop.wait(self.interval_s):
            try:
                self.registry.register(self.info(), self.ttl_s)
            except Exception as e:  # one failed beat must not end the heartbeat: the next one tries again
                error = f"{type(e).__name__}: {e}"
                if error != last_error:  # once per distinct error, not every interval
                    log.warning(
                        "engine %s heartbeat failed (retried every %gs): %s", self.engine_id, self.interval_s, error
                    )
                last_error = error
            else:
                if last_error:
                    log.info("engine %s heartbeat works again", self.engine_id)
                last_error = ""

    @property
    def alive(self) -> bool:
        """The heartbeat thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5.0)
        self.registry.deregister(self.engine_id)
        log.info("deregistered engine %s", self.engine_id)
