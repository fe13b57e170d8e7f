"""The monitoring files agree with the services: every metric deploy/grafana/longtrace.json queries is exported by
one of our exporters, and deploy/compose/prometheus.yml scrapes the compose services where they serve /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.unit.test_deploy_commands import COMPOSE, ENV_EXAMPLE, check_command, load_compose, read_env_file

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "longtrace.json"
PROMETHEUS_YML = COMPOSE.parent / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
# Compose services Prometheus does not scrape, and why.
NOT_SCRAPED = {
    "redis": "no /metrics of its own: scraped through redis-exporter (profile monitoring)",
    "grafana": "the dashboard itself",
    "eval": "a one-shot job (profile eval): its results are files under /runs, not a live endpoint",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}


# ---------------------------------------------------------------- the dashboard's metric names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords, labels or durations."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # grouping labels
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\(?)", e):
        if not m.group(2) and m.group(1) not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def dashboard_exprs(doc: dict[str, Any]) -> Iterator[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(doc["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can serve (a counter `x` serves `x_total`, a histogram `x_bucket` ...)."""
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
    return names


@pytest.fixture(scope="module")
def all_exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names of every exporter of ours, each built for real: learner, built-in engine, rollout worker, reward."""
    from learner.prom import LearnerExporter
    from reward_service.metrics import REGISTRY
    from rollout_server.engine.config import EngineConfig
    from rollout_server.engine.engine import Engine
    from rollout_server.engine.metrics import EngineMetrics
    from rollout_server.models import init_tiny_model
    from rollout_server.worker.metrics import RolloutMetrics
    from rollout_server.worker.router import EngineLoad

    model = init_tiny_model(tmp_path_factory.mktemp("names") / "m", seed=0)
    engine = Engine(EngineConfig(model_path=str(model), max_running_requests=2, context_length=64))
    rollout = RolloutMetrics()
    rollout.watch_engines(lambda: [EngineLoad("e", 0, True, 0, 0)])
    registries = [LearnerExporter().registry, EngineMetrics(engine).registry, rollout.registry, REGISTRY]
    return set().union(*(exported_names(r) for r in registries))


def missing_names(doc: dict[str, Any], exported: set[str]) -> dict[str, set[str]]:
    """expr -> the names it queries that no exporter serves."""
    return {e: promql_metric_names(e) - exported for e in dashboard_exprs(doc) if promql_metric_names(e) - exported}


def test_promql_names_are_extracted() -> None:
    """Guards against a name extractor that finds nothing (every dashboard would pass) or mistakes functions,
    grouping labels, durations and label values for metrics."""
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(reward_http_request_seconds_bucket{route="/v1/score"}[5m])))'
    )
    assert promql_metric_names(expr) == {"reward_http_request_seconds_bucket"}
    assert promql_metric_names("sum by (instance) (sglang:num_running_reqs) / sglang:max_total_num_tokens") == {
        "sglang:num_running_reqs",
        "sglang:max_total_num_tokens",
    }
    assert promql_metric_names("increase(longtrace_learner_weight_pushes_total[1h]) > bool 0") == {
        "longtrace_learner_weight_pushes_total"
    }


def test_every_dashboard_metric_is_exported(all_exported: set[str]) -> None:
    """Guards against a dashboard panel that stays empty forever: a metric renamed in an exporter (as the rollout
    worker's were, to longtrace_rollout_*) or misspelt in the JSON. The check must also be able to fail: a
    dashboard with one misspelt name is caught."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = list(dashboard_exprs(doc))
    queried = set().union(*(promql_metric_names(e) for e in exprs))
    assert len(exprs) >= 20 and {n.split("_")[0].split(":")[0] for n in queried} >= {"longtrace", "sglang", "reward"}
    assert missing_names(doc, all_exported) == {}
    doc["panels"].append({"targets": [{"expr": "sum(rate(longtrace_rollout_grops_total[5m]))"}]})
    assert missing_names(doc, all_exported) == {
        "sum(rate(longtrace_rollout_grops_total[5m]))": {"longtrace_rollout_grops_total"}
    }


def test_dashboard_covers_each_service(all_exported: set[str]) -> None:
    """Guards against a dashboard that misses a service's essentials (the issue's panel list)."""
    queried = set().union(*(promql_metric_names(e) for e in dashboard_exprs(json.loads(DASHBOARD.read_text()))))
    assert queried >= {
        "longtrace_learner_step",
        "longtrace_learner_policy_version",
        "longtrace_learner_staleness_mean",
        "longtrace_learner_loss",
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:generation_tokens_total",
        "reward_http_requests_total",
        "reward_http_request_seconds_bucket",
        "longtrace_rollout_groups_total",
        "longtrace_rollout_in_flight_groups",
    }


# ---------------------------------------------------------------- prometheus.yml against the compose file


def scrape_jobs() -> dict[str, list[str]]:
    doc = yaml.safe_load(PROMETHEUS_YML.read_text())
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in doc["scrape_configs"]
    }


def flag(command: list[Any], name: str) -> str:
    args = [str(a) for a in command]
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def test_prometheus_scrapes_every_compose_service_where_it_serves() -> None:
    """Guards against a scrape config that drifts from the compose file: a job for a service that does not exist,
    a service (new or renamed) that nobody scrapes without a stated reason, or a target port other than the one the
    service binds (the port in .env.example or on its command line)."""
    services = load_compose()["services"]
    jobs = scrape_jobs()
    assert set(jobs) <= set(services), set(jobs) - set(services)
    assert set(services) - set(jobs) == set(NOT_SCRAPED), "services neither scraped nor in NOT_SCRAPED"
    assert all(t.startswith("127.0.0.1:") for targets in jobs.values() for t in targets), "host network: loopback"
    ports = {job: [int(t.rsplit(":", 1)[1]) for t in targets] for job, targets in jobs.items()}

    reward = check_command([str(a) for a in services["reward-api"]["command"]])
    assert ports["reward-api"] == [reward.port] == [int(read_env_file(ENV_EXAMPLE)["REWARD_PORT"])]
    engine = check_command([str(a) for a in services["engine-0"]["command"]])
    assert ports["engine-0"] == [engine.port]
    assert "--enable-metrics" in engine.extra_args, "SGLang serves /metrics only with --enable-metrics"
    learner = check_command([str(a) for a in services["learner"]["command"]])
    assert ports["learner"] == [learner.prometheus.port] and learner.prometheus.port != 0
    rollout = check_command([str(a) for a in services["rollout"]["command"]])
    assert rollout.metrics and ports["rollout"] == list(
        range(rollout.metrics_port, rollout.metrics_port + len(ports["rollout"]))
    )
    assert int(services["rollout"]["deploy"]["replicas"]) <= len(ports["rollout"]) <= rollout.metrics_port_span
    worker = check_command([str(a) for a in services["reward-worker"]["command"]]).worker
    assert worker.metrics and ports["reward-worker"] == list(
        range(worker.metrics_port, worker.metrics_port + len(ports["reward-worker"]))
    )
    assert (
        int(services["reward-worker"]["deploy"]["replicas"]) <= len(ports["reward-worker"]) <= worker.metrics_port_span
    )
    exporter = services["redis-exporter"]["environment"]
    assert ports["redis-exporter"] == [int(exporter["REDIS_EXPORTER_WEB_LISTEN_ADDRESS"].rsplit(":", 1)[1])]
    redis_port = read_env_file(ENV_EXAMPLE)["REDIS_PORT"]
    assert exporter["REDIS_ADDR"] == f"redis://127.0.0.1:{redis_port}", "the exporter must read the compose Redis"
    listen = flag(services["prometheus"]["command"], "--web.listen-address")
    assert ports["prometheus"] == [int(listen.rsplit(":", 1)[1])]
    every = [p for ps in ports.values() for p in ps]
    assert len(every) == len(set(every)), "two jobs scrape one port"


def test_monitoring_is_an_optional_profile_with_the_dashboard_provisioned() -> None:
    """Guards against monitoring that starts with every `docker compose up` (it must be opt-in), and against a
    Grafana that starts without the dashboard or without a datasource pointing at the Prometheus service."""
    services = load_compose()["services"]
    for name in ("prometheus", "grafana", "redis-exporter"):
        assert services[name]["profiles"] == ["monitoring"], name
        assert services[name]["network_mode"] == "host", name
    assert any(
        v.startswith("./prometheus.yml:/etc/prometheus/prometheus.yml") for v in services["prometheus"]["volumes"]
    )
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert (COMPOSE.parent / "../grafana/longtrace.json").resolve() == DASHBOARD
    dashboards_dir = str(Path(mounts["../grafana/longtrace.json"]).parent)
    provisioning = mounts["../grafana/provisioning"]
    assert provisioning == "/etc/grafana/provisioning"
    [provider] = yaml.safe_load((GRAFANA / "provisioning/dashboards/longtrace.yml").read_text())["providers"]
    assert provider["options"]["path"] == dashboards_dir
    [source] = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    listen = flag(services["prometheus"]["command"], "--web.listen-address")
    assert source["url"] == f"http://{listen}" and source["type"] == "prometheus"
    uids = {t["datasource"]["uid"] for e in json.loads(DASHBOARD.read_text())["panels"] for t in e.get("targets", [])}
    assert uids == {source["uid"]}
