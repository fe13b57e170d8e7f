"""A userspace netem: delay, jitter and loss on a node's link, for kernels without `sch_netem` (VM kernels).

Where the kernel has no netem qdisc, a shaped node's link is not a veth but two TAP devices: `lt0` inside the node's
namespace and a port on the cluster's bridge. This process holds both ends' file descriptors and relays every
Ethernet frame between them, each direction through its own queue: a frame is dropped with probability `loss_pct`,
otherwise held `delay_ms` +- `jitter_ms` (uniform, as netem draws it without a distribution table; frames leave in
due order, so jitter reorders them as netem's does). Both directions are shaped, like netem on both ends of a veth.
A bridge port that is down (a partition) refuses writes: those frames are lost, as on a cut cable.

    python -m deploy.cluster.shaper FD_NODE:FD_PORT [FD_NODE:FD_PORT ...]     # fds inherited (pass_fds)

Control lines on stdin, one per change, answered `ok` on stdout: `I DELAY_MS JITTER_MS LOSS_PCT` sets link I (its
position on the command line). The harness (netns.py) makes the devices and starts this; it dies with stdin's EOF.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536
BURST = 64  # frames read from one fd per wake-up, so one busy link cannot starve the others' timers


def open_tap(name: str) -> int:
    """A new TAP device `name` in this process's network namespace, and the fd that holds it (it lives as long as
    the fd: closing it deletes the device)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Shape:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    def hold_s(self, rng: random.Random) -> float | None:
        """How long a frame waits, or None when it is lost."""
        if self.loss_pct and rng.random() * 100.0 < self.loss_pct:
            return None
        if not self.jitter_ms:
            return self.delay_ms / 1000.0
        return max(0.0, rng.uniform(self.delay_ms - self.jitter_ms, self.delay_ms + self.jitter_ms)) / 1000.0


class Relay:
    """Every link's two fds, one heap of frames due out, one epoll loop."""

    def __init__(self, pairs: list[tuple[int, int]], seed: int | None = None) -> None:
        self.shapes = [Shape() for _ in pairs]
        self.peer: dict[int, tuple[int, int]] = {}  # fd -> (fd its frames go to, link index)
        for i, (node_fd, port_fd) in enumerate(pairs):
            self.peer[node_fd] = (port_fd, i)
            self.peer[port_fd] = (node_fd, i)
        self.due: list[tuple[float, int, int, bytes]] = []  # (due time, sequence, fd to write, frame)
        self.seq = 0
        self.rng = random.Random(seed)
        self.counts = {"relayed": 0, "lost": 0, "refused": 0}

    def on_readable(self, fd: int, now: float) -> None:
        out, link = self.peer[fd]
        shape = self.shapes[link]
        for _ in range(BURST):
            try:
                frame = os.read(fd, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError as e:  # the device went away (teardown) or is down
                if e.errno in (errno.EBADF, errno.EIO, errno.EFAULT):
                    return
                raise
            hold = shape.hold_s(self.rng)
            if hold is None:
                self.counts["lost"] += 1
            elif hold == 0.0 and not self.due:
                self._write(out, frame)
            else:
                self.seq += 1
                heapq.heappush(self.due, (now + hold, self.seq, out, frame))

    def flush(self, now: float) -> float | None:
        """Write every frame now due; seconds until the next one (None: nothing waits)."""
        while self.due and self.due[0][0] <= now:
            _, _, out, frame = heapq.heappop(self.due)
            self._write(out, frame)
        return max(0.0, self.due[0][0] - now) if self.due else None

    def _write(self, fd: int, frame: bytes) -> None:
        try:
            os.write(fd, frame)
            self.counts["relayed"] += 1
        except OSError:  # EIO: that side is down (a partition); EAGAIN: its queue is full. Lost either way.
            self.counts["refused"] += 1


def serve(pairs: list[tuple[int, int]], control_in: int, control_out: int) -> None:
    relay = Relay(pairs)
    ep = select.epoll()
    for fd in relay.peer:
        ep.register(fd, select.EPOLLIN)
    ep.register(control_in, select.EPOLLIN)
    buf = b""
    timeout: float | None = None
    while True:
        events = ep.poll(-1 if timeout is None else timeout)
        now = time.monotonic()
        for fd, _ in events:
            if fd != control_in:
                relay.on_readable(fd, now)
                continue
            data = os.read(control_in, 4096)
            if not data:
                return  # the harness is gone: so are we (the devices go with our fds)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                i, delay, jitter, loss = line.split()
                relay.shapes[int(i)] = Shape(float(delay), float(jitter), float(loss))
                os.write(control_out, b"ok\n")
        timeout = relay.flush(time.monotonic())


class RelayProcess:
    """The harness's handle on this module run as a process: it inherits the links' fds (closed here once it has
    them: the TAP devices then live exactly as long as it does) and takes shape changes over its stdin."""

    def __init__(self, fds: list[tuple[int, int]]) -> None:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.cluster.shaper", *(f"{a}:{b}" for a, b in fds)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=[fd for pair in fds for fd in pair],
                cwd=Path(__file__).resolve().parents[2],
                start_new_session=True,
            )
        finally:
            for pair in fds:
                for fd in pair:
                    os.close(fd)

    def tell(self, line: str, timeout_s: float = 10.0) -> None:
        """Send one control line; RuntimeError unless the relay answers `ok` within `timeout_s`."""
        proc = self.proc
        if proc.poll() is not None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError(f"the userspace shaper is not running (exit {proc.returncode})")
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)  # one `ok` per line: nothing left buffered
        answer = proc.stdout.readline() if ready else b""
        if answer.strip() != b"ok":
            raise RuntimeError(f"the userspace shaper did not take {line!r} within {timeout_s:g} s: {answer!r}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m deploy.cluster.shaper FD_NODE:FD_PORT [...]")
    pairs = [(int(a), int(b)) for a, b in (arg.split(":") for arg in argv)]
    serve(pairs, sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main(sys.argv[1:])
