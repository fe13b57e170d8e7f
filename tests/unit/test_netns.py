"""The cluster harness's pure logic (deploy/cluster/netns.py) and the cluster bench's config: names, addresses, netem
arguments; nothing here needs root."""

from __future__ import annotations

import ipaddress

import pytest

from common.config import ConfigError, load_config
from deploy.cluster.netns import (
    IFACE,
    MAX_IFNAME,
    available,
    bridge_name,
    hosts_file,
    netem_args,
    new_run_id,
    plan_nodes,
    subnet_for,
)
from experiments.cluster_config import REPO, ClusterConfig

BENCH = REPO / "configs" / "bench" / "cluster.toml"

NAMES = ["rollout", "learner0", "learner1", "learner2", "learner3"]


def test_names_fit_ifnamsiz_and_differ_between_runs() -> None:
    """Guards against interface names over 15 characters (`ip link add` refuses them) and against two parallel runs
    naming the same namespace, veth or bridge."""
    a, b = "0a1b2c", "ffffff"
    for run in (a, b):
        nodes = plan_nodes(run, NAMES, subnet_for(run))
        assert all(len(n.veth) <= MAX_IFNAME for n in nodes) and len(bridge_name(run)) <= MAX_IFNAME
        assert len({n.veth for n in nodes}) == len({n.netns for n in nodes}) == len({n.hostname for n in nodes}) == 5
    na = plan_nodes(a, NAMES, subnet_for(a))
    nb = plan_nodes(b, NAMES, subnet_for(b))
    assert not {n.veth for n in na} & {n.veth for n in nb} and not {n.netns for n in na} & {n.netns for n in nb}
    assert bridge_name(a) != bridge_name(b) and len(IFACE) <= MAX_IFNAME
    assert len(new_run_id()) == 6 and new_run_id() != new_run_id()


def test_subnet_is_private_per_run_and_avoids_the_hosts_routes() -> None:
    """Guards against a cluster subnet that overlaps a network the host already routes (its default interface's),
    which would break the host's own traffic, and against runs sharing one subnet."""
    net = subnet_for("000102")
    assert net.prefixlen == 24 and net.subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))
    assert 64 <= net.network_address.packed[1] <= 191
    assert subnet_for("000102") == net and subnet_for("000103") != net
    moved = subnet_for("000102", [net])
    assert moved != net and not moved.overlaps(net)
    assert not subnet_for("000102", [ipaddress.IPv4Network("10.0.0.0/9")]).overlaps(ipaddress.IPv4Network("10.0.0.0/9"))


def test_node_addresses_leave_the_gateway_to_the_bridge() -> None:
    """Guards against a node given the bridge's address (.1, this host's way in) or two nodes one address."""
    net = subnet_for("abcdef")
    nodes = plan_nodes("abcdef", NAMES, net)
    addrs = [n.address for n in nodes]
    assert addrs[0] == str(net.network_address + 2) and len(set(addrs)) == 5
    assert str(net.network_address + 1) not in addrs
    text = hosts_file(nodes)
    assert all(f"{n.address}\t{n.hostname}" in text for n in nodes) and "localhost" in text
    with pytest.raises(ValueError, match="distinct"):
        plan_nodes("abcdef", ["a", "a"], net)
    with pytest.raises(ValueError, match="letters"):
        plan_nodes("abcdef", ["a b"], net)


def test_netem_arguments() -> None:
    """Guards against a malformed tc command (units, order of delay / jitter / loss) and impossible values."""
    assert netem_args(50, 20) == ["netem", "delay", "50ms", "20ms"]
    assert netem_args(0.5, 0, 100) == ["netem", "delay", "0.5ms", "loss", "100%"]
    for bad in ((-1, 0, 0), (10, 20, 0), (10, 0, 101)):
        with pytest.raises(ValueError):
            netem_args(*bad)


def test_available_gives_a_reason_when_it_cannot() -> None:
    """Guards against a skip without a reason: the harness's answer is (ok, why), why empty only when ok."""
    ok, why = available()
    assert isinstance(ok, bool) and (ok == (why == ""))


def test_cluster_config_refuses_unknown_keys_and_impossible_plans() -> None:
    """Guards against a typo in configs/bench/cluster.toml being ignored, and a fault planned after the last step."""
    cfg = load_config(ClusterConfig, BENCH)
    assert cfg.learner_nodes == 4 and cfg.delays_ms == [0.0, 50.0] and cfg.faults == ["partition_rollout"]
    with pytest.raises(ConfigError, match="learner_node"):
        load_config(ClusterConfig, BENCH, ["--learner_node", "2"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(ClusterConfig, BENCH, ["--steps", "2", "--fault_after_step", "2"])
    with pytest.raises(ConfigError, match="learner_nodes"):
        load_config(ClusterConfig, None, ["--learner_nodes", "1", "--faults", '["partition_learner"]'])
