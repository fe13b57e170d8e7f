"""Property-based fuzzing of our HTTP APIs from their OpenAPI schemas (schemathesis + hypothesis).

Each operation of a schema gets `max_examples` generated requests in positive mode (bodies the schema
allows) and as many in negative mode (bodies it forbids), against an ASGI app in-process or a server over
real HTTP. A request passes when the answer is not 5xx and a 4xx names the problem: a JSON body with a
non-empty `detail` (FastAPI), `message` (SGLang's error shape, also 401/413 of the engine) or
`error.message` (SGLang's /generate). The run counts instead of stopping at the first failure, so a report
carries whole figures; `failures` keeps a few examples to reproduce with.

`reward_app`/`engine_app` build the two services the way the tests and `longtrace bench fuzz` fuzz them:
the reward service with the rule judge, the built-in engine on a tiny model with small limits, so that
every request it accepts finishes in well under a second.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.progress import bar

log = logging.getLogger(__name__)

# A control call that changes what later requests see, and the call that undoes it.
ENGINE_FOLLOW_UPS: dict[str, tuple[str, str, Any]] = {
    "/pause_generation": ("POST", "/continue_generation", {}),
}


@dataclass
class FuzzReport:
    """What one run saw. `endpoints`: operations (method + path) fuzzed."""

    requests: int = 0
    status_5xx: int = 0
    status_4xx_without_reason: int = 0
    transport_errors: int = 0
    endpoints: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.requests > 0 and not (self.status_5xx or self.status_4xx_without_reason or self.transport_errors)

    def merge(self, other: FuzzReport) -> FuzzReport:
        return FuzzReport(
            requests=self.requests + other.requests,
            status_5xx=self.status_5xx + other.status_5xx,
            status_4xx_without_reason=self.status_4xx_without_reason + other.status_4xx_without_reason,
            transport_errors=self.transport_errors + other.transport_errors,
            endpoints=self.endpoints + other.endpoints,
            by_status=self.by_status + other.by_status,
            failures=self.failures + other.failures,
            seconds=self.seconds + other.seconds,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "status_5xx": self.status_5xx,
            "status_4xx_without_reason": self.status_4xx_without_reason,
            "transport_errors": self.transport_errors,
            "endpoints": self.endpoints,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "seconds": round(self.seconds, 1),
            "failures": self.failures,
        }


def reason_of(body: bytes) -> str:
    """The problem a 4xx body names ("" if none): `detail`, `message` or `error.message` of a JSON object."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    error = doc.get("error")
    for value in (doc.get("detail"), doc.get("message"), error.get("message") if isinstance(error, dict) else None):
        if value:  # a non-empty string, or FastAPI's non-empty list of validation errors
            return value if isinstance(value, str) else json.dumps(value)
    return ""


def fuzz_schema(
    schema: Any,
    *,
    max_examples: int,
    headers: Mapping[str, str] | None = None,
    base_url: str | None = None,
    timeout_s: float = 30.0,
    seed: int = 0,
    follow_ups: Mapping[str, tuple[str, str, Any]] | None = None,
    max_failures: int = 10,
) -> FuzzReport:
    """Fuzz every operation of a loaded schemathesis schema; see the module docstring for what passes."""
    import hypothesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    report = FuzzReport()
    start = time.perf_counter()
    extra = dict(headers or {})
    follow_ups = follow_ups or {}

    def record(label: str, status: int, body: bytes, sent: Any) -> None:
        report.requests += 1
        report.by_status[status] += 1
        problem = ""
        if status >= 500:
            report.status_5xx += 1
            problem = "5xx"
        elif 400 <= status < 500 and not reason_of(body):
            report.status_4xx_without_reason += 1
            problem = "4xx without a reason"
        if problem and len(report.failures) < max_failures:
            report.failures.append(f"{label} -> {status} ({problem}): {body[:300]!r} for body {str(sent)[:300]}")

    def fuzz_operation(operation: Any, mode: GenerationMode) -> None:

        @hypothesis.seed(seed)
        @hypothesis.settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.generate],
            verbosity=hypothesis.Verbosity.quiet,
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            try:
                response = case.call(base_url=base_url, headers=extra, timeout=timeout_s)
            except Exception as e:  # a hang or a crash the transport saw: count it, keep going
                report.requests += 1
                report.transport_errors += 1
                if len(report.failures) < max_failures:
                    report.failures.append(f"{operation.label}: {type(e).__name__}: {str(e)[:300]}")
                return
            record(operation.label, response.status_code, response.content, case.body)
            undo = follow_ups.get(operation.path)
            if undo is not None:
                method, path, body = undo
                schema[path][method].Case(body=body).call(base_url=base_url, headers=extra, timeout=timeout_s)

        try:
            run()
        except Unsatisfiable:  # negative mode of an operation without parameters: nothing to break
            pass

    operations = list(schema.get_all_operations())
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    where = "http" if base_url else "app"
    with bar(len(operations) * len(modes), f"fuzz ({where})", "operation") as progress:  # an operation in a mode
        for result in operations:
            report.endpoints += 1
            for mode in modes:
                fuzz_operation(result.ok(), mode)
                progress.set_postfix(requests=report.requests, refresh=False)
                progress.update()
    report.seconds = time.perf_counter() - start
    return report


def fuzz_app(app: Any, **kwargs: Any) -> FuzzReport:
    """Fuzz an ASGI app in-process from its /openapi.json."""
    import schemathesis

    return fuzz_schema(schemathesis.openapi.from_asgi("/openapi.json", app), **kwargs)


def fuzz_url(url: str, headers: Mapping[str, str] | None = None, **kwargs: Any) -> FuzzReport:
    """Fuzz a server over real HTTP from `url`/openapi.json."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=dict(headers or {}), timeout=30)
    return fuzz_schema(schema, headers=headers, base_url=url, **kwargs)


def reward_app(token: str | None = None) -> Any:
    """The reward service's app with the rule judge (auth on when `token` is given)."""
    import os

    from reward_service.app import create_app
    from reward_service.config import RewardConfig

    config = RewardConfig()
    if token:
        os.environ["LONGTRACE_FUZZ_REWARD_TOKEN"] = token
        config = RewardConfig(auth_token_env="LONGTRACE_FUZZ_REWARD_TOKEN")
    return create_app(config)


def engine_config(model_dir: str | Path, **overrides: Any) -> Any:
    """EngineConfig for fuzzing: small limits so every accepted request is cheap, a short rendezvous deadline
    (a fuzzed /init_weights_update_group waits for a master that is not there)."""
    from rollout_server.engine.config import EngineConfig

    fields: dict[str, Any] = {
        "model_path": str(model_dir),
        "max_running_requests": 8,
        "context_length": 160,
        "max_request_items": 8,
        "weight_update_timeout_s": 0.5,
        "control_timeout_s": 30.0,
        "api_key_env": "",
    }
    fields.update(overrides)
    return EngineConfig(**fields)
