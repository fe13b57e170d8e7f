"""A supervisor of child processes: ordered start with readiness checks, failure propagation, ordered shutdown.

Each child runs in its own session (so its own process group): a Ctrl-C on the terminal reaches only the
launcher, which then stops the children in reverse start order (the learner before the engines, Redis last),
each with SIGTERM to its whole group, then SIGKILL once its deadline passes. Descendants that left the group
(e.g. the redis-server that `longtrace redis` starts in a session of its own) are found with psutil before
the signal and killed if they outlive their parent, so no process is left behind. On Linux every child also
gets SIGTERM when the launcher dies without cleaning up (PR_SET_PDEATHSIG). This module owns the order and the
bookkeeping; common/proctree.py does the signalling (sessions, process groups, descendants).

Every child writes stdout and stderr to `<log_dir>/<name>.log`. A child that exits while it should be
running (a service), or with a non-zero code (a job), raises `ChildFailed`, whose message names the process,
its exit code, its log file and the tail of that log.

Supervised restarts (used by the chaos bench, experiments/chaos_monkey.py): `kill` SIGKILLs a child and all its
descendants at once, as a crash would, and `respawn` starts it again in place (same `Child` object, same
name and log file, optionally a new spec), so whoever holds the child keeps following it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from common.proctree import (
    STOP_SIGNALS,
    child_setup,
    describe_exit,
    living,
    remember_descendants,
    send,
    signal_group,
)

log = logging.getLogger(__name__)


class ChildFailed(RuntimeError):
    """A supervised process exited when it should not have, or did not become ready in time."""

    def __init__(self, name: str, reason: str, log_path: Path, tail: str) -> None:
        self.name = name
        self.reason = reason
        self.log_path = log_path
        self.tail = tail
        super().__init__(f"process {name!r} {reason} (log: {log_path})\n--- last lines of {log_path.name} ---\n{tail}")


class Readiness(Protocol):
    """One cheap probe of whether a child serves; must return within a few seconds."""

    def describe(self) -> str: ...

    def probe(self, child: Child) -> bool: ...


@dataclass(frozen=True)
class HttpReady:
    """Ready once GET `url` answers 200."""

    url: str
    timeout_s: float = 2.0

    def describe(self) -> str:
        return f"GET {self.url} -> 200"

    def probe(self, child: Child) -> bool:
        import httpx

        try:
            return httpx.get(self.url, timeout=self.timeout_s).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass(frozen=True)
class RedisReady:
    """Ready once Redis at `url` answers PING."""

    url: str
    timeout_s: float = 1.0

    def describe(self) -> str:
        return f"PING {self.url}"

    def probe(self, child: Child) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        finally:
            client.close()


@dataclass(frozen=True)
class LogReady:
    """Ready once a line of the child's log matches the regular expression `pattern`."""

    pattern: str

    def describe(self) -> str:
        return f"a log line matching {self.pattern!r}"

    def probe(self, child: Child) -> bool:
        return re.search(self.pattern, child.read_log(), re.MULTILINE) is not None


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    """Short unique name: the log file is `<name>.log`."""
    argv: list[str]
    """Command line (argv[0] is looked up on PATH)."""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Variables set on top of the launcher's environment (left out of repr: it may hold the Redis password)."""
    ready: Readiness | None = None
    """How to tell the child serves; None: running counts as ready."""
    ready_timeout_s: float = 120.0
    """Fail when the child is not ready this long after its start."""
    stop_timeout_s: float = 30.0
    """After SIGTERM, the child's group gets this long to exit before SIGKILL."""
    job: bool = False
    """A job ends by itself (exit 0 is success); a service must run until it is stopped."""
    cwd: str | None = None
    """Working directory; None: the launcher's."""


@dataclass
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_s: float
    stopping: bool = False
    killed: bool = False
    """SIGKILL was needed (the child or a descendant ignored SIGTERM past its deadline)."""
    known: dict[int, psutil.Process] = field(default_factory=dict)
    """Descendants seen so far: a crashed child's orphans are still found and stopped."""
    log_offset: int = 0
    """Size of the log file when this run of the child started: readiness looks only at its own lines."""
    restarts: int = 0
    """How often `Supervisor.respawn` started the child again."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def read_log(self) -> str:
        """The log of the current run of the child (a respawned child appends to the same file)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def log_tail(self, num_lines: int = 30, max_bytes: int = 16384) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-num_lines:])

    def remember_descendants(self) -> None:
        """Add the running child's current descendants to `known`; nothing once it has ended (its pid may be
        reused by then)."""
        if self.returncode is None:
            remember_descendants(self.pid, self.known)

    def living_descendants(self) -> list[psutil.Process]:
        """The descendants seen so far (looked up again while the child runs) that still run: what a kill of the
        child must reach besides its process group."""
        self.remember_descendants()
        return living(self.known.values())


class Supervisor:
    """Starts children in order and watches them; `stop_all` stops them in reverse order."""

    def __init__(self, log_dir: str | Path, poll_s: float = 0.1) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self.children: list[Child] = []
        self.exit_codes: dict[str, int] = {}
        """Every child that has ended, by name: its exit code (negative: killed by that signal)."""
        self._hurry = False
        self._next_scan = 0.0

    # -- start and watch

    def start(self, spec: ProcessSpec, wait_ready: bool = True) -> Child:
        """Start `spec` and (unless `wait_ready` is False) wait until it is ready; raise ChildFailed if it, or
        another child, fails meanwhile."""
        if any(c.name == spec.name for c in self.running()):
            raise ValueError(f"a process named {spec.name!r} is already running")
        log_path = self.log_dir / f"{spec.name}.log"
        # A Ctrl-C between the fork and the bookkeeping below would leave an untracked child: block it until then.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc, offset = self._spawn(spec, log_path)
            child = Child(spec, proc, log_path, time.monotonic(), log_offset=offset)
            self.children.append(child)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("started %s (pid %d), log %s", spec.name, proc.pid, log_path)
        if wait_ready:
            self.wait_ready(child)
        return child

    @staticmethod
    def _spawn(spec: ProcessSpec, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
        """Fork `spec` with its output appended to `log_path`; return the process and where its lines start."""
        with log_path.open("ab") as out:
            offset = out.tell()
            out.write(f"# longtrace up: {time.strftime('%H:%M:%S')} start: {' '.join(spec.argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
                start_new_session=True,
                # preexec_fn is unsafe only when other threads fork at the same time; the launcher has none.
                preexec_fn=child_setup(os.getpid()),
            )
        return proc, offset

    def wait_ready(self, child: Child) -> None:
        """Wait until `child` passes its readiness probe, watching every child meanwhile."""
        ready = child.spec.ready
        if ready is None:
            return
        deadline = child.started_s + child.spec.ready_timeout_s
        while not ready.probe(child):
            self.check()
            if time.monotonic() > deadline:
                raise ChildFailed(
                    child.name,
                    f"was not ready after {child.spec.ready_timeout_s:.0f}s (waited for {ready.describe()})",
                    child.log_path,
                    child.log_tail(),
                )
            time.sleep(self.poll_s)
        log.info("%s is ready (%.1fs)", child.name, time.monotonic() - child.started_s)

    def running(self) -> list[Child]:
        return [c for c in self.children if c.returncode is None]

    def check(self) -> None:
        """Raise ChildFailed for the first child that ended when it should not have; record finished jobs."""
        if time.monotonic() >= self._next_scan:
            for child in self.running():
                child.remember_descendants()
            self._next_scan = time.monotonic() + 1.0
        for child in self.children:
            code = child.returncode
            if code is None or child.stopping or child.name in self.exit_codes:
                continue
            self.exit_codes[child.name] = code
            if child.spec.job and code == 0:
                log.info("%s finished (%.1fs)", child.name, time.monotonic() - child.started_s)
                continue
            what = describe_exit(code) + ("" if child.spec.job else " while it should be running")
            raise ChildFailed(child.name, what, child.log_path, child.log_tail())

    def wait(self, child: Child, tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> None:
        """Wait for job `child` to finish with exit 0, watching every other child; call `tick` every `tick_s`."""
        assert child.spec.job, f"{child.name} is a service: it does not finish by itself"
        next_tick = time.monotonic()
        while True:
            self.check()
            if child.name in self.exit_codes:
                return
            if tick is not None and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + tick_s
            time.sleep(self.poll_s)

    # -- supervised restarts (the chaos bench)

    def kill(self, child: Child) -> int:
        """SIGKILL the child's group and every descendant at once, as a crash would: no grace, no cleanup.
        Returns the child's exit code; `check` does not report it (call `respawn` before the next check)."""
        alive = child.living_descendants()
        signal_group(child.pid, signal.SIGKILL)
        send(alive, signal.SIGKILL)  # descendants in sessions of their own (redis-server, an engine's server)
        psutil.wait_procs(alive, timeout=10)
        code = child.proc.wait(timeout=10)
        log.warning("%s killed (%s), %d descendants with it", child.name, describe_exit(code), len(alive))
        return code

    def respawn(self, child: Child, spec: ProcessSpec | None = None, wait_ready: bool = True) -> Child:
        """Start an ended child again in place (optionally with a new spec of the same name): the same `Child`
        object, so the phase's list of started processes and a `wait` on it follow the new process."""
        if child.returncode is None:
            raise ValueError(f"{child.name} still runs: kill it before respawning it")
        spec = spec or child.spec
        if spec.name != child.name:
            raise ValueError(f"respawn {child.name!r} as {spec.name!r}: a respawned child keeps its name")
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc, offset = self._spawn(spec, child.log_path)
            child.spec, child.proc, child.log_offset = spec, proc, offset
            child.started_s, child.known, child.stopping = time.monotonic(), {}, False
            child.restarts += 1
            self.exit_codes.pop(child.name, None)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("respawned %s (pid %d, restart %d)", child.name, proc.pid, child.restarts)
        if wait_ready:
            self.wait_ready(child)
        return child

    # -- stop

    def hurry(self) -> None:
        """Skip the remaining grace periods (a second Ctrl-C): SIGKILL whatever still runs."""
        self._hurry = True

    def stop(self, child: Child, timeout_s: float | None = None) -> int:
        """SIGTERM the child's process group, SIGKILL it after `timeout_s`; kill descendants that outlive it."""
        child.stopping = True
        timeout_s = child.spec.stop_timeout_s if timeout_s is None else timeout_s
        child.remember_descendants()
        was_running = child.returncode is None
        if was_running:
            signal_group(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while child.returncode is None and time.monotonic() < deadline and not self._hurry:
                time.sleep(min(self.poll_s, 0.05))
            if child.returncode is None:
                log.warning("%s did not exit %.0fs after SIGTERM: SIGKILL", child.name, timeout_s)
                child.killed = True
                signal_group(child.pid, signal.SIGKILL)
                child.proc.wait(timeout=10)
        # Descendants in other sessions or that survived their parent's exit (torchrun workers, redis-server).
        alive = child.living_descendants()
        if alive:
            send(alive, signal.SIGTERM)
            _, still = psutil.wait_procs(alive, timeout=0 if self._hurry else min(timeout_s, 5.0))
            if still:
                child.killed = True
                send(still, signal.SIGKILL)
                psutil.wait_procs(still, timeout=5.0)
        code = child.proc.wait(timeout=10)
        self.exit_codes.setdefault(child.name, code)
        if was_running:
            log.info("%s stopped (%s)", child.name, describe_exit(code))
        return code

    def stop_all(self, deadline_s: float = 60.0) -> None:
        """Stop every child in reverse start order within `deadline_s` in total; SIGKILL the rest after it."""
        end = time.monotonic() + deadline_s
        for child in reversed(self.children):
            left = max(0.0, end - time.monotonic())
            self.stop(child, min(child.spec.stop_timeout_s, left))

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
