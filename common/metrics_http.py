"""A registry's Prometheus /metrics served on a daemon thread (prometheus_client's WSGI server), with a clean close:
the learner's rank 0 and the rollout workers serve theirs this way (the HTTP services add a route instead)."""

from __future__ import annotations

import errno
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsHTTP:
    """Serves one registry; `port` is the port bound (0: not served)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.port = 0
        self._server: WSGIServer | None = None

    def start(self, host: str, port: int, span: int = 1) -> int:
        """Bind the first free port of `port .. port + span - 1`, else one the OS picks (as `port` 0 does); returns
        the port bound."""
        candidates = [port + i for i in range(span) if port and port + i <= 65535] + [0]
        for candidate in candidates:
            try:
                self._server, _ = start_http_server(candidate, addr=host, registry=self.registry)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            break
        assert self._server is not None  # port 0 never collides
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
