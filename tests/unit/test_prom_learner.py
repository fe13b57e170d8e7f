"""The learner's Prometheus endpoint (learner/prom.py): a real exporter fed steps as train_loop feeds its logger,
scraped over HTTP."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.net import free_port
from learner.metrics import METRICS_FILE
from learner.prom import LearnerExporter, serve_exporter
from learner.tracking import build_metrics_logger

STEP_1 = {
    "loss": 0.5,
    "entropy": math.nan,  # non-finite: left out, as the trackers leave it out
    "policy_version": 1.0,
    "num_samples": 8.0,
    "num_loss_tokens": 100.0,
    "tokens_per_s": 50.0,
    "groups_trained": 2.0,
    "groups_admitted": 4.0,
    "staleness/0": 1.0,
    "staleness/1": 1.0,
    "weight_sync/ok": 1.0,
    "weight_sync/total_s": 0.25,
    "weight_sync/bytes": 1000.0,
    "groups_in_flight": 3.0,
    "custom/x": 3.0,
}
STEP_2 = {
    "loss": 0.25,
    "policy_version": 1.0,
    "num_samples": 8.0,
    "num_loss_tokens": 120.0,
    "tokens_per_s": 60.0,
    "groups_trained": 4.0,
    "groups_admitted": 6.0,
    "staleness/1": 2.0,
    "weight_sync/ok": 0.0,
    "weight_sync/total_s": 2.0,
    "weight_sync/bytes": 0.0,
    "groups_in_flight": 1.0,
}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics: (name, sorted labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, trust_env=False).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


@pytest.fixture
def exporter() -> Iterator[LearnerExporter]:
    exp = LearnerExporter()
    exp.serve("127.0.0.1", 0)
    yield exp
    exp.close()


def test_two_steps_are_served_as_gauges_and_monotonic_counters(exporter: LearnerExporter) -> None:
    """Guards against the learner's endpoint serving the wrong kind of number: a level (loss, version, staleness,
    push time) that sums up across steps, a count (samples, tokens, groups, pushes) that is reset to the step's value
    instead of growing, a run total (groups_trained) added whole at every step (it would double-count), or a counter
    that goes down (Prometheus would read a restart and rate() would jump)."""
    exporter.log(1, STEP_1)
    first = scrape(exporter.port)
    assert value(first, "longtrace_learner_step") == 1
    assert value(first, "longtrace_learner_loss") == 0.5
    assert value(first, "longtrace_learner_entropy") == 0  # the NaN was not set
    assert value(first, "longtrace_learner_staleness_mean") == 0.5
    assert value(first, "longtrace_learner_staleness_groups", lag="0") == 1
    assert value(first, "longtrace_learner_groups_trained_total") == 2
    assert value(first, "longtrace_learner_weight_pushes_total", outcome="ok") == 1
    assert value(first, "longtrace_learner_metric", name="custom/x") == 3

    exporter.log(2, STEP_2)
    second = scrape(exporter.port)
    assert value(second, "longtrace_learner_step") == 2
    assert value(second, "longtrace_learner_loss") == 0.25
    assert value(second, "longtrace_learner_tokens_per_s") == 60
    assert value(second, "longtrace_learner_policy_version") == 1
    assert value(second, "longtrace_learner_weight_sync_total_seconds") == 2.0
    assert value(second, "longtrace_learner_groups_in_flight") == 1
    assert value(second, "longtrace_learner_staleness_mean") == 1.0
    assert value(second, "longtrace_learner_staleness_max") == 1.0
    assert ("longtrace_learner_staleness_groups", (("lag", "0"),)) not in second  # this step had no fresh group
    assert value(second, "longtrace_learner_samples_trained_total") == 16
    assert value(second, "longtrace_learner_loss_tokens_trained_total") == 220
    assert value(second, "longtrace_learner_weight_sync_bytes_total") == 1000
    assert value(second, "longtrace_learner_groups_trained_total") == 4  # the run total, not 2 + 4
    assert value(second, "longtrace_learner_groups_admitted_total") == 6
    assert value(second, "longtrace_learner_weight_pushes_total", outcome="failed") == 1
    counters = [key for key in first if key[0].endswith("_total")]
    assert len(counters) >= 6
    assert all(second[key] >= first[key] for key in counters), "a counter went down"

    exporter.log(3, STEP_2 | {"groups_trained": 3.0})  # a run total that reads lower never lowers the counter
    assert value(scrape(exporter.port), "longtrace_learner_groups_trained_total") == 4


def test_the_logger_hook_writes_metrics_jsonl_and_serves_the_same_step(tmp_path: Path) -> None:
    """Guards against the exporter replacing or starving the record: metrics.jsonl must get the step first, the
    endpoint the same numbers, and closing must stop the endpoint (no port left bound after the run)."""
    port = free_port()
    exporter = serve_exporter("127.0.0.1", port, is_writer=True)
    assert exporter is not None
    logger = build_metrics_logger(tmp_path, is_writer=True, extra_trackers={"prometheus": exporter})
    logger.log(7, dict(STEP_1), trained_group_ids=["g1", "g2"])
    [line] = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert json.loads(line)["step"] == 7 and json.loads(line)["loss"] == 0.5
    assert value(scrape(port), "longtrace_learner_step") == 7
    logger.close()
    with pytest.raises(httpx.ConnectError):
        scrape(port)


def test_off_by_default_and_on_rank_0_only(tmp_path: Path) -> None:
    """Guards against every torchrun rank binding the same port (all but one would crash at start) and against an
    endpoint nobody asked for: port 0 and ranks other than 0 get no exporter and bind nothing."""
    from learner.train_config import PrometheusConfig

    assert PrometheusConfig().port == 0
    port = free_port()
    assert serve_exporter("127.0.0.1", port, is_writer=False) is None
    with pytest.raises(httpx.ConnectError):
        scrape(port)  # nothing bound on a rank other than 0
    assert serve_exporter("127.0.0.1", 0, is_writer=True) is None
