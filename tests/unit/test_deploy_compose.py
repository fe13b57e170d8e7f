"""deploy/compose/docker-compose.yml is a valid Compose file that keeps the deployment's promises.

Validity: the Compose specification's JSON schema (the copy vendored by check-jsonschema, `vendor.compose-spec`)
after interpolating .env.example, and, where Debian's `docker-compose` is installed, its own `config` check
(it needs no Docker engine). The promises: start order by healthchecks, Redis with a password and an
append-only file on a named volume, GPU reservations, disjoint GPU sets, scalable workers, no unset variable.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy_commands import COMPOSE, ENV_EXAMPLE, interpolate, load_compose, read_env_file


def compose_schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return dict(json.loads(ref.read_text()))


def test_compose_file_matches_the_compose_specification() -> None:
    """Guards against a Compose file that `docker compose up` rejects: a misspelt or misplaced key, a wrong type
    (e.g. a GPU reservation in the wrong place), a bad healthcheck or depends_on shape."""
    import jsonschema

    doc = load_compose()
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)


def test_schema_check_catches_a_misplaced_key() -> None:
    """Guards against the schema check passing everything (a vacuous validator): a typo'd service key must fail."""
    import jsonschema

    doc = load_compose()
    doc["services"]["rollout"]["replica"] = 2
    assert list(jsonschema.Draft202012Validator(compose_schema()).iter_errors(doc))


def test_docker_compose_config_accepts_the_file() -> None:
    """Guards against what the schema cannot see (interpolation, anchors, merge keys) as a real Compose sees it."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("Debian's docker-compose is not installed (apt-get install docker-compose)")
    out = subprocess.run(
        [exe, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_every_variable_is_in_env_example_and_every_setting_is_used() -> None:
    """Guards against a variable the user cannot find in .env.example, and a setting there that does nothing."""
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    documented = set(read_env_file(ENV_EXAMPLE))
    assert used - documented == set(), "variables missing from .env.example"
    assert documented - used - {"COMPOSE_PROJECT_NAME"} == set(), "settings of .env.example that nothing uses"


def test_required_variables_fail_loudly() -> None:
    """Guards against starting with an empty password or no model: unset required settings must stop Compose."""
    env = read_env_file(ENV_EXAMPLE)
    for name in ("REDIS_PASSWORD", "MODEL_NAME", "MODEL_DIR", "JUDGE_URL"):
        with pytest.raises(AssertionError, match=name):
            interpolate(yaml.safe_load(COMPOSE.read_text()), {k: v for k, v in env.items() if k != name})


def test_startup_order_follows_healthchecks() -> None:
    """Guards against services racing at start: Redis and the engine are waited on until healthy, the learner
    starts last, and every depends_on names a real service."""
    services = load_compose()["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for name in ("redis", "reward-api", "engine-0"):
        assert "healthcheck" in services[name], name
    learner_deps = services["learner"]["depends_on"]
    assert learner_deps["redis"]["condition"] == "service_healthy"
    assert learner_deps["engine-0"]["condition"] == "service_healthy"
    assert {"reward-worker", "rollout"} <= set(learner_deps)
    for name, svc in services.items():
        # Prometheus, Grafana and the eval job (which talks to the engine and the reward API) need no Redis
        if name != "redis" and not {"monitoring", "eval"} & set(svc.get("profiles", [])):
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_engines_run_without_sglang_generating_health() -> None:
    """Guards against issue 21: SGLang's /health generates a token by default, which a paused engine answers 503
    after 20 s, so the engine's healthcheck and every probe during a weight push would take it for dead. Every
    engine service must set SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 (as slime does)."""
    services = load_compose()["services"]
    engines = [name for name in services if name.startswith("engine")]
    assert engines
    for name in engines:
        assert services[name]["environment"].get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION") == "0", name
        assert services[name]["healthcheck"]["test"][-1].endswith("/health"), name


def test_redis_keeps_queued_data_across_down() -> None:
    """Guards against `docker compose down` losing queued groups: append-only file on a named volume (down keeps
    volumes), redis-server as PID 1 (it must get SIGTERM to flush), and a password."""
    doc = load_compose()
    redis = doc["services"]["redis"]
    script = redis["command"][-1]
    assert "--appendonly yes" in script and "exec redis-server" in script and "requirepass" in script
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in doc["volumes"]
    assert redis["environment"]["REDIS_PASSWORD"] == read_env_file(ENV_EXAMPLE)["REDIS_PASSWORD"]


def test_gpu_services_reserve_gpus_and_split_them() -> None:
    """Guards against the engine and the learner fighting over GPUs, or not getting any: both reserve NVIDIA
    GPUs, pick disjoint sets, share IPC for NCCL, and see the same run volume (exports for late engines)."""
    services = load_compose()["services"]
    gpu_sets = []
    for name in ("engine-0", "learner"):
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert svc["ipc"] == "host" and svc["network_mode"] == "host", name
        assert any(v.startswith("runs:/runs") for v in svc["volumes"]), name
        gpu_sets.append(set(svc["environment"]["CUDA_VISIBLE_DEVICES"].split(",")))
    assert gpu_sets[0] and gpu_sets[1] and not gpu_sets[0] & gpu_sets[1]


def test_workers_scale_with_unique_consumer_names() -> None:
    """Guards against scaled replicas sharing one consumer name (they would steal each other's pending entries):
    with host networking every replica has the host's name, so they must share the host PID namespace, and no
    fixed --worker_id / --worker.consumer may be set."""
    services = load_compose()["services"]
    for name in ("rollout", "reward-worker"):
        svc = services[name]
        assert int(svc["deploy"]["replicas"]) >= 1, name
        assert svc["pid"] == "host", name
        assert not {"--worker_id", "--worker.consumer"} & set(svc["command"]), name


def test_nccl_watchdog_settings_and_a_redis_that_never_evicts() -> None:
    """Guards against defect 8 of issue 19 in the one-node deployment (an engine dying mid-broadcast got learner
    rank 0 killed by the heartbeat monitor, and the surviving engines tore themselves down), and against a Redis
    that may evict the run's keys (dedup keys have a TTL: volatile-* policies drop them)."""
    services = load_compose()["services"]
    for name, handling in (("learner", "3"), ("engine-0", "2")):
        env = services[name]["environment"]
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == handling, name
        assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0" and int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > 120, name
    assert "--maxmemory-policy noeviction" in services["redis"]["command"][-1]
