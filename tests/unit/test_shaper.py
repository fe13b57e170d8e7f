"""The userspace link shaper's queueing (deploy/cluster/shaper.py), on datagram socket pairs standing in for the
TAP devices (one datagram = one frame), so it runs without root. The harness test with real TAP links is
tests/integration/test_cluster_netns.py::test_link_shaping_delays_drops_and_partitions."""

from __future__ import annotations

import random
import socket
import time

from deploy.cluster.shaper import Relay, Shape


def _link() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """(node side, relay's node end, relay's port end, bridge side)."""
    node, relay_node = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    relay_port, bridge = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (relay_node, relay_port, bridge, node):
        s.setblocking(False)
    return node, relay_node, relay_port, bridge


def _pump(relay: Relay, fds: list[int], until_s: float) -> None:
    end = time.monotonic() + until_s
    while time.monotonic() < end:
        for fd in fds:
            relay.on_readable(fd, time.monotonic())
        relay.flush(time.monotonic())
        time.sleep(0.001)


def _drain(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(65536))
        except BlockingIOError:
            return out


def test_frames_wait_the_delay_each_way_and_keep_their_order() -> None:
    """Guards against a shaper that forwards at once (a "50 ms" run measuring a clean link), shapes one direction
    only, or reorders frames without jitter (TCP would see spurious losses netem does not cause)."""
    node, rn, rp, bridge = _link()
    relay = Relay([(rn.fileno(), rp.fileno())], seed=0)
    relay.shapes[0] = Shape(delay_ms=50)
    for i in range(20):
        node.send(b"up%02d" % i)
        bridge.send(b"dn%02d" % i)
    t0 = time.monotonic()
    _pump(relay, [rn.fileno(), rp.fileno()], 0.03)
    assert _drain(bridge) == [] and _drain(node) == []  # 30 ms in: still held, both ways
    _pump(relay, [rn.fileno(), rp.fileno()], 0.05)
    assert time.monotonic() - t0 >= 0.05
    assert _drain(bridge) == [b"up%02d" % i for i in range(20)]
    assert _drain(node) == [b"dn%02d" % i for i in range(20)]


def test_loss_and_jitter_follow_their_numbers() -> None:
    """Guards against a loss rate or jitter range the relay does not honour: 100 % loss passes nothing, 30 % loses
    about 30 %, and jittered holds stay within delay +- jitter."""
    node, rn, rp, bridge = _link()
    relay = Relay([(rn.fileno(), rp.fileno())], seed=1)
    relay.shapes[0] = Shape(loss_pct=100)
    for i in range(50):
        node.send(b"%d" % i)
    _pump(relay, [rn.fileno()], 0.02)
    assert _drain(bridge) == [] and relay.counts["lost"] == 50
    rng = random.Random(2)
    holds = [Shape(delay_ms=50, jitter_ms=20).hold_s(rng) for _ in range(2000)]
    assert all(h is not None and 0.030 <= h <= 0.070 for h in holds)
    assert max(h for h in holds if h is not None) - min(h for h in holds if h is not None) > 0.035  # spread, not fixed
    lost = sum(Shape(loss_pct=30).hold_s(rng) is None for _ in range(5000))
    assert 1300 < lost < 1700


def test_a_refused_write_is_counted_lost_not_fatal() -> None:
    """Guards against the relay dying when a bridge port is down (a partition makes the TAP refuse writes): every
    other link would lose its relay too. A closed peer stands in for the refusing device."""
    node, rn, rp, bridge = _link()
    relay = Relay([(rn.fileno(), rp.fileno())], seed=0)
    bridge.close()  # writes to rp now fail (ECONNREFUSED), as a TAP that is down fails with EIO
    node.send(b"x")
    _pump(relay, [rn.fileno()], 0.01)
    assert relay.counts["refused"] == 1 and relay.counts["relayed"] == 0
    node.send(b"y")  # and it keeps relaying
    _pump(relay, [rn.fileno()], 0.01)
    assert relay.counts["refused"] == 2
