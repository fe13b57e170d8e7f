"""A cluster of "machines" on one Linux host: one network namespace per node on a bridge, for multi-node tests.

Each node gets its own namespace, IPv4 address, host name (a UTS namespace per process, and `/etc/netns/NS/hosts`,
which `ip netns exec` mounts over /etc/hosts, naming every node) and one interface, `lt0`, a veth whose other end is
on the run's bridge. The bridge holds the subnet's `.1`, so this (root) namespace reaches every node, as a
monitoring host would. Names and the subnet 10.X.Y.0/24 derive from a random run id, so parallel runs do not
collide; nothing of the host's own interfaces or routes is touched.

    with Cluster(["rollout", "learner0"]) as c:
        p = c.popen("rollout", ["redis-server"], env, log_path)   # runs inside the node's namespace
        c.shape("rollout", delay_ms=50, jitter_ms=20)            # netem on the node's link
        c.partition("rollout"); ...; c.heal("rollout")           # link down / up

Link shaping (`shaper`): "netem" is the kernel's qdisc on both ends of the veth. Kernels without sch_netem (this
machine's Firecracker VM kernel) get "userspace": each link is two TAP devices (`lt0` in the node, a port on the
bridge) relayed frame by frame by shaper.py with the same delay, jitter and loss (`netem_available()` says which a
host has). It is chosen when the cluster is made; `shape()` then sets or changes the numbers at any time.

Teardown (processes, namespaces, veths, bridge, /etc/netns files) runs on exit of the `with`, on an exception, at
interpreter exit (atexit) and on SIGTERM (turned into SystemExit while a cluster is up). `available()` says whether
this host can do it at all (root, `ip`, `unshare`), as a (ok, reason) pair usable as a pytest skip reason.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal

from deploy.cluster.shaper import RelayProcess, open_tap

log = logging.getLogger(__name__)

IFACE = "lt0"
"""The node's interface name inside its namespace (what NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name)."""
NETNS_ETC = Path("/etc/netns")
MAX_IFNAME = 15  # IFNAMSIZ - 1
Shaper = Literal["netem", "userspace"]


@dataclass(frozen=True)
class Node:
    name: str  # the role given by the caller, e.g. "learner0"
    hostname: str  # unique per run, in every node's /etc/hosts
    netns: str
    veth: str  # the host-side end, on the bridge
    address: str


def new_run_id() -> str:
    return secrets.token_hex(3)


def subnet_for(run_id: str, taken: Iterable[ipaddress.IPv4Network] = ()) -> ipaddress.IPv4Network:
    """10.X.Y.0/24 with X, Y from the run id (X in 64..191: clear of the 10.0/10.1 many hosts use), moved on past
    any network in `taken` (the host's routes)."""
    n = int(run_id, 16)
    taken = list(taken)
    for i in range(128 * 256):
        k = (n + i) % (128 * 256)
        net = ipaddress.IPv4Network(f"10.{64 + k // 256}.{k % 256}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the cluster's bridge")


def plan_nodes(run_id: str, names: Sequence[str], subnet: ipaddress.IPv4Network) -> list[Node]:
    """The nodes of a run: namespace `lt-RUN-i`, host-side veth `ltRUNvi`, host name `ROLE-RUN`, address .(i+2)."""
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"node names must be distinct and non-empty: {list(names)}")
    if len(names) > 200:
        raise ValueError("at most 200 nodes on one /24")
    hosts = list(subnet.hosts())
    nodes = []
    for i, name in enumerate(names):
        if not name.replace("-", "").isalnum():
            raise ValueError(f"node name {name!r}: letters, digits and - only")
        veth = f"lt{run_id}v{i}"
        assert len(veth) <= MAX_IFNAME, veth
        nodes.append(Node(name, f"{name}-{run_id}", f"lt-{run_id}-{i}", veth, str(hosts[i + 1])))
    return nodes


def bridge_name(run_id: str) -> str:
    return f"lt{run_id}br"


def netem_args(delay_ms: float, jitter_ms: float = 0.0, loss_pct: float = 0.0) -> list[str]:
    """The `netem ...` part of a tc qdisc command."""
    if delay_ms < 0 or jitter_ms < 0 or not 0 <= loss_pct <= 100:
        raise ValueError(f"netem: delay {delay_ms} ms, jitter {jitter_ms} ms, loss {loss_pct} %")
    if jitter_ms > delay_ms:
        raise ValueError(f"netem: jitter {jitter_ms} ms above the delay {delay_ms} ms")
    args = ["netem", "delay", f"{delay_ms:g}ms"]
    if jitter_ms:
        args.append(f"{jitter_ms:g}ms")
    if loss_pct:
        args += ["loss", f"{loss_pct:g}%"]
    return args


def hosts_file(nodes: Sequence[Node]) -> str:
    return "127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "".join(f"{n.address}\t{n.hostname}\n" for n in nodes)


def available() -> tuple[bool, str]:
    """(True, "") when this process can build a cluster; else (False, why)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return False, f"no `{tool}` on PATH"
    probe = f"lt-probe-{new_run_id()}"
    try:
        _ip("netns", "add", probe)
    except ClusterError as e:
        return False, f"cannot create a network namespace: {e}"
    with contextlib.suppress(ClusterError):
        _ip("netns", "del", probe)
    return True, ""


def netem_available() -> tuple[bool, str]:
    """Whether the kernel has sch_netem (some VM kernels do not): tried on the loopback of a namespace of our own."""
    probe = f"lt-probe-{new_run_id()}"
    _ip("netns", "add", probe)
    try:
        _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", *netem_args(0.0)])
        return True, ""
    except ClusterError as e:
        return False, f"no sch_netem in this kernel ({e})"
    finally:
        with contextlib.suppress(ClusterError):
            _ip("netns", "del", probe)


class ClusterError(RuntimeError):
    """A command of the harness failed; the message names it and its stderr."""


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _ip(*args: str) -> str:
    return _run(["ip", *args])


_LIVE: list[Cluster] = []


def _teardown_all() -> None:
    for c in list(_LIVE):
        c.teardown()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `with`, whose exit tears down


atexit.register(_teardown_all)


class Cluster:
    """N namespaces on a bridge; see the module docstring."""

    def __init__(self, names: Sequence[str], run_id: str | None = None, shaper: Shaper | None = None) -> None:
        """`shaper`: how `shape()` applies delay and loss (see the module docstring); None: the cluster cannot be
        shaped, and its links are plain veths (no relay in the way)."""
        self.run_id = run_id or new_run_id()
        self.shaper = shaper
        self._relay: RelayProcess | None = None  # the userspace shaper
        routes = [ipaddress.IPv4Network(r.split()[0]) for r in _ip("-4", "route").splitlines() if "/" in r.split()[0]]
        self.subnet = subnet_for(self.run_id, routes)
        self.nodes = {n.name: n for n in plan_nodes(self.run_id, names, self.subnet)}
        self.bridge = bridge_name(self.run_id)
        self.gateway = str(next(self.subnet.hosts()))  # the bridge's address: this namespace's way in
        self.procs: list[subprocess.Popen[bytes]] = []
        self.faults: list[str] = []  # what was applied, in order ("delay 50ms 20ms on rollout", ...)
        self._made: list[tuple[str, str]] = []  # ("bridge"|"veth"|"netns"|"etc", name), in creation order
        self._old_sigterm: Any = None

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Cluster:
        _LIVE.append(self)
        if not _LIVE[:-1] and threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            self._create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.teardown()

    def _create(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("bridge", self.bridge))
        _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        fds: list[tuple[int, int]] = []  # the userspace shaper's (node end, bridge end) of each link
        try:
            self._create_nodes(prefix, fds)
        except BaseException:
            for fd in (fd for pair in fds for fd in pair):  # no relay holds them yet: they would keep the TAPs up
                os.close(fd)
            raise
        if fds:
            self._relay = RelayProcess(fds)
        log.info("cluster %s: %s on %s", self.run_id, {k: n.address for k, n in self.nodes.items()}, self.bridge)

    def _create_nodes(self, prefix: int, fds: list[tuple[int, int]]) -> None:
        hosts = hosts_file(list(self.nodes.values()))
        for n in self.nodes.values():
            _ip("netns", "add", n.netns)
            self._made.append(("netns", n.netns))
            etc = NETNS_ETC / n.netns
            etc.mkdir(parents=True, exist_ok=True)
            self._made.append(("etc", str(etc)))
            (etc / "hosts").write_text(hosts)
            (etc / "hostname").write_text(n.hostname + "\n")
            if self.shaper == "userspace":
                fds.append(self._tap_link(n))
            else:
                _ip("link", "add", n.veth, "type", "veth", "peer", "name", IFACE, "netns", n.netns)
                self._made.append(("veth", n.veth))
            _ip("link", "set", n.veth, "master", self.bridge, "up")
            self.exec(n.name, "ip", "addr", "add", f"{n.address}/{prefix}", "dev", IFACE)
            self.exec(n.name, "ip", "link", "set", IFACE, "up")
            self.exec(n.name, "ip", "link", "set", "lo", "up")

    def _tap_link(self, n: Node) -> tuple[int, int]:
        """The node's link as two TAP devices for the userspace shaper: one made here and moved into the node as
        `lt0` (the fd stays attached across the move), one on the bridge under the veth's name (so partition and
        heal work the same). The fds are ours until the relay has inherited them."""
        inner = f"{n.veth}t"
        node_fd = open_tap(inner)
        try:
            _ip("link", "set", inner, "netns", n.netns, "name", IFACE)
            port_fd = open_tap(n.veth)
        except BaseException:
            os.close(node_fd)
            raise
        self._made.append(("veth", n.veth))
        return node_fd, port_fd

    def teardown(self) -> None:
        """Stop every process started here, then delete what was made, newest first. Idempotent."""
        for p in self.procs:
            _kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            _kill_group(p, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.procs.clear()
        if self._relay is not None:  # its fds hold the TAP links: stopping it deletes them
            self._relay.stop()
            self._relay = None
        while self._made:
            kind, name = self._made.pop()
            try:
                if kind == "netns":
                    for pid in _ip("netns", "pids", name).split():  # only ours live there
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    _ip("netns", "del", name)
                elif kind == "etc":
                    shutil.rmtree(name, ignore_errors=True)
                else:
                    _ip("link", "del", name)
            except ClusterError as e:
                if "Cannot find device" not in str(e) and "No such file" not in str(e):
                    log.warning("cluster %s teardown: %s", self.run_id, e)
        if self in _LIVE:
            _LIVE.remove(self)
            if not _LIVE and self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)

    # ------------------------------------------------------------------ processes

    def node(self, name: str) -> Node:
        if name not in self.nodes:
            raise KeyError(f"no node {name!r} (nodes: {', '.join(self.nodes)})")
        return self.nodes[name]

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the node: its namespace, and its own host name (a UTS namespace of its own)."""
        n = self.node(name)
        inner = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", n.netns, "unshare", "--uts", "sh", "-c", inner, n.hostname, *argv]

    def exec(self, name: str, *argv: str) -> str:
        """Run a short command inside the node's namespace; its stdout."""
        return _run(["ip", "netns", "exec", self.node(name).netns, *argv])

    def popen(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: str | Path | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside the node (its own session, so teardown stops its whole process group)."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            out = Path(log_path).open("ab")
        try:
            proc = subprocess.Popen(
                self.argv(name, argv),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
        """SIGTERM the process group, SIGKILL after `timeout_s`; its exit status."""
        _kill_group(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            return proc.wait(10)

    # ------------------------------------------------------------------ faults

    def shape(self, name: str, delay_ms: float, jitter_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Delay, jitter and loss on the node's link, both ways (its own egress and its bridge port's), so a round
        trip between two shaped nodes pays the delay four times, and one with this host twice."""
        args = netem_args(delay_ms, jitter_ms, loss_pct)  # validates, for either shaper
        if self.shaper == "netem":
            n = self.node(name)
            _run(["tc", "qdisc", "replace", "dev", n.veth, "root", *args])
            self.exec(name, "tc", "qdisc", "replace", "dev", IFACE, "root", *args)
        elif self.shaper == "userspace":
            self._tell(f"{list(self.nodes).index(name)} {delay_ms:g} {jitter_ms:g} {loss_pct:g}")
        else:
            raise ClusterError("this cluster was made without a shaper: Cluster(..., shaper='netem'|'userspace')")
        self.faults.append(f"{' '.join(args[1:])} on {name} ({self.shaper})")

    def clear(self, name: str) -> None:
        if self.shaper == "userspace":
            return self._tell(f"{list(self.nodes).index(name)} 0 0 0")
        with contextlib.suppress(ClusterError):  # nothing to delete
            _run(["tc", "qdisc", "del", "dev", self.node(name).veth, "root"])
        with contextlib.suppress(ClusterError):
            self.exec(name, "tc", "qdisc", "del", "dev", IFACE, "root")

    def _tell(self, line: str) -> None:
        if self._relay is None:
            raise ClusterError("the userspace shaper is not running")
        try:
            self._relay.tell(line)
        except RuntimeError as e:
            raise ClusterError(str(e)) from e

    def partition(self, name: str) -> None:
        """Cut the node off: its bridge port goes down (the node's own interface loses carrier too)."""
        _ip("link", "set", self.node(name).veth, "down")
        self.faults.append(f"partition of {name}")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.node(name).veth, "up")


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
