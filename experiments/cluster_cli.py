"""`longtrace bench cluster`: the shipped multi-node scripts on 1 rollout node + N learner nodes, each a network
namespace of this machine, with a link delay and a partition; every admitted group accounted for (registered by
deploy/cli.py).

longtrace bench cluster [--json] [--config configs/bench/cluster.toml] [--delays_ms '[0, 50]'] [--learner_nodes 4]

Prints one JSON object: nodes, learner_nodes, steps, steps_per_min and push_s (median weight_sync/total_s) per delay,
link, faults, groups_lost, groups_duplicated, conservation_ok, finished, note, and each run under `runs`
(experiments/cluster_scenario.py). Exit status 1 unless every run finished with nothing lost or duplicated; 2 when
this host cannot make namespaces (not root, no `ip`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import Logs, SubParsers, add_config, bench, print_result

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench" / "cluster.toml"


def register(commands: SubParsers, benches: SubParsers) -> None:
    """Add `bench cluster`. Keep imports inside the handler."""
    b = bench(
        benches,
        "cluster",
        _bench,
        json_help="print only the JSON result",
        overrides=True,
        logs=Logs(prefix="cluster ", level="INFO"),
        help="the torchrun scripts on 5 network namespaces (1 rollout node, 4 learner nodes): a delay, a partition, "
        "nothing lost or doubled",
        description="Run deploy/torchrun/*.sh across network namespaces of this machine (root): one clean run per "
        "delay, the faults in the last; account for every admitted group as the chaos bench does.",
        epilog="Overrides: --delays_ms '[0, 50]' --faults '[\"partition_learner\"]' --learner_nodes 2 --steps 8 ...",
    )
    add_config(b, "ClusterConfig TOML (default: %(default)s)", default=str(DEFAULT_CONFIG))


def _bench(args: argparse.Namespace) -> int:
    import logging

    from common.config import ConfigError
    from deploy.cluster.netns import available
    from experiments.cluster_config import load_cluster_config
    from experiments.cluster_scenario import run_bench

    cfg = load_cluster_config(args.config, args.overrides)
    ok, why = available()
    if not ok:
        raise ConfigError(f"bench cluster: {why}")
    if args.json:
        logging.getLogger().handlers[0].setLevel(logging.ERROR)
    result = run_bench(cfg)
    print_result(result, as_json=True)
    return 0 if result["finished"] and not result["groups_lost"] and not result["groups_duplicated"] else 1
