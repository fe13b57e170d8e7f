"""The operating-system side of supervising a child process (common/supervisor.py decides when; this does it).

A child starts in a session of its own, with the stop signals unblocked and, on Linux, SIGTERM promised to it when
the launcher dies (PR_SET_PDEATHSIG). Stopping signals the child's whole process group; descendants that left the
group (a redis-server in its own session, torchrun workers) are remembered with psutil while their parent lives,
so they can still be signalled after it exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable

import psutil

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
"""Blocked in the launcher around a fork (a Ctrl-C there would leave an untracked child), unblocked in the child."""


def child_setup(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: unblock the stop signals (blocked in the launcher around the fork) and, on Linux, have the
    child get SIGTERM when the launcher dies, even by SIGKILL."""

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent_pid:  # the launcher died before prctl took effect
                os._exit(1)

    return setup


def describe_exit(code: int) -> str:
    """ "exited with code N" or "was killed by SIGNAME" (a negative Popen return code is the signal)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def remember_descendants(pid: int, known: dict[int, psutil.Process]) -> None:
    """Add the current descendants of a running `pid` to `known` (by pid); nothing when it has exited."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(pid).children(recursive=True):
            known.setdefault(p.pid, p)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """`sig` to the process group led by `pid` (start_new_session: pgid == pid, even after the leader exited)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def living(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes that still run (a zombie does not)."""
    return [p for p in procs if _is_alive(p)]


def send(procs: Iterable[psutil.Process], sig: signal.Signals) -> None:
    """`sig` to each process; one that is gone already is skipped."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _is_alive(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running()) and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
