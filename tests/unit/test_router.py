"""The built-in router: least outstanding requests, per-engine caps, retry elsewhere, the circuit breaker and
registry membership (the in-memory broker stands in for Redis here; the integration tests use Redis)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest

from broker.base import EngineInfo
from broker.memory import MemoryBroker
from common.config import load_config
from common.net import free_port
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.router import BuiltinRouter, Engine, GroupAffinity, NoEngineAvailable


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused, as for a dead engine


def _cfg(urls: list[str], **router: Any) -> RolloutConfig:
    overrides = ["--engines.use_registry", "false", "--engines.urls", repr(urls).replace("'", '"')]
    for k, v in router.items():
        overrides += [f"--router.{k}", str(v)]
    return load_config(RolloutConfig, overrides=overrides)


def test_least_outstanding_spreads_and_fills_the_emptiest() -> None:
    """Guards against round-robin or first-fit routing that piles requests on one engine while another idles."""
    a, b = _dead_url(), _dead_url()

    async def main() -> None:
        router = BuiltinRouter(_cfg([a, b]), None)
        async with AsyncExitStack() as stack:
            picked = [(await stack.enter_async_context(router.lease())).url for _ in range(4)]
            assert sorted(picked) == sorted([a, a, b, b])
            loads = {e.engine_id: e.outstanding for e in router.snapshot()}
            assert loads == {a: 2, b: 2}
        async with router.lease() as e1, router.lease() as e2:
            assert {e1.url, e2.url} == {a, b}
        await router.close()

    asyncio.run(main())


def test_excluded_engine_is_avoided_unless_it_is_the_only_one() -> None:
    """Guards against a failed request being retried on the engine that just failed it while another is up,
    and against a lone engine never being retried."""

    async def main() -> None:
        a, b = _dead_url(), _dead_url()
        router = BuiltinRouter(_cfg([a, b]), None)
        for _ in range(3):
            async with router.lease(exclude=(a,)) as e:
                assert e.url == b
        await router.close()
        lone = BuiltinRouter(_cfg([a]), None)
        async with lone.lease(exclude=(a,)) as e:
            assert e.url == a
        await lone.close()

    asyncio.run(main())


def test_per_engine_cap_makes_requests_wait_for_a_slot() -> None:
    """Guards against exceeding max_inflight_per_engine (an overloaded engine) instead of queueing."""

    async def main() -> None:
        router = BuiltinRouter(_cfg([_dead_url()], max_inflight_per_engine=1), None)
        async with router.lease():
            waiter = asyncio.create_task(_hold(router))
            await asyncio.sleep(0.2)
            assert not waiter.done()
        await asyncio.wait_for(waiter, 2.0)
        await router.close()

    asyncio.run(main())


async def _hold(router: BuiltinRouter) -> str:
    async with router.lease() as e:
        return e.url


def test_breaker_takes_a_failing_engine_out_and_probe_keeps_a_dead_one_out() -> None:
    """Guards against a dead engine staying in rotation (every retry landing on it) and against an engine
    that still fails its health check being let back in after the cooldown."""

    async def main() -> None:
        a, b = _dead_url(), _dead_url()
        router = BuiltinRouter(_cfg([a, b], failure_threshold=2, cooldown_s=0.05, engine_wait_timeout_s=0.3), None)
        engine_a = _engine(router, a)
        router.report_failure(engine_a, "connection refused")
        assert all(x.in_rotation for x in router.snapshot())  # one failure is below the threshold
        router.report_failure(engine_a, "connection refused")
        in_rotation = {x.engine_id: x.in_rotation for x in router.snapshot()}
        assert in_rotation == {a: False, b: True}
        for _ in range(3):
            async with router.lease() as e:
                assert e.url == b
        await asyncio.sleep(0.1)
        await router.probe()  # both ports are dead: the probe takes b out as well and keeps a out
        await router.probe()
        assert not any(x.in_rotation for x in router.snapshot())
        with pytest.raises(NoEngineAvailable):
            async with router.lease():
                pass
        await router.close()

    asyncio.run(main())


def _engine(router: BuiltinRouter, url: str) -> Engine:
    engine = router._engines[url]
    assert engine.url == url
    return engine


def test_registry_engines_join_and_leave_but_finish_their_requests() -> None:
    """Guards against engines added while a run goes being ignored, and against an engine whose heartbeat
    expired being dropped while a request on it is still out (its slot accounting would break)."""

    async def main() -> None:
        broker = MemoryBroker()
        cfg = load_config(RolloutConfig, overrides=["--engines.use_registry", "true"])
        router = BuiltinRouter(cfg, broker)
        await router.refresh()
        assert router.snapshot() == []
        url = _dead_url()
        broker.engines.register(EngineInfo(engine_id="e0", url=url + "/"), ttl_s=30)
        await router.refresh()
        assert [x.engine_id for x in router.snapshot()] == ["e0"]
        async with router.lease() as e:
            assert e.url == url
            broker.engines.deregister("e0")
            await router.refresh()
            assert [(x.engine_id, x.in_rotation) for x in router.snapshot()] == [("e0", False)]
        assert router.snapshot() == []
        await router.close()

    asyncio.run(main())


def test_paused_sample_stops_waiting_for_a_dead_engine() -> None:
    """Guards against a sample paused by a weight push waiting out resume_timeout_s (600 s) on an engine that was
    killed meanwhile: its group, and the learner waiting for that group, stalled (found by `bench chaos`). A
    refused connection, or the router taking the engine out of rotation, must end the wait at once."""
    from rollout_server.worker.generation import SampleGenerator
    from rollout_server.worker.metrics import RolloutMetrics

    async def main() -> None:
        url = _dead_url()
        cfg = load_config(
            RolloutConfig,
            overrides=["--engines.use_registry", "false", "--engines.urls", f'["{url}"]', "--resume_poll_s", "0.01"],
        )
        assert cfg.resume_timeout_s >= 60
        router = BuiltinRouter(cfg, None)
        generator = SampleGenerator(cfg, router, processor=None, metrics=RolloutMetrics())  # type: ignore[arg-type]
        async with router.lease() as engine:
            assert not await asyncio.wait_for(generator._wait_generating(engine), timeout=10)
            engine.removed = True  # left the registry: no /health poll at all
            assert not await asyncio.wait_for(generator._wait_generating(engine), timeout=1)
        await router.close()

    asyncio.run(main())


def test_a_groups_requests_stay_on_the_engine_its_first_lease_picked() -> None:
    """Guards against spreading a group's samples by load (each engine that gets one prefills the shared prompt
    again): the first lease picks the least-loaded engine, the group's other leases follow it even though the other
    engine is emptier, and a second group starts on the least-loaded engine."""
    a, b = _dead_url(), _dead_url()

    async def main() -> None:
        router = BuiltinRouter(_cfg([a, b]), None)
        g1, g2 = GroupAffinity(), GroupAffinity()
        async with AsyncExitStack() as stack:
            first = [(await stack.enter_async_context(router.lease(affinity=g1))).url for _ in range(4)]
            assert len(set(first)) == 1 and g1.engine_id == first[0]
            second = [(await stack.enter_async_context(router.lease(affinity=g2))).url for _ in range(4)]
            assert len(set(second)) == 1 and second[0] != first[0]
        await router.close()

    asyncio.run(main())


def test_group_affinity_yields_to_retries_full_engines_and_the_breaker() -> None:
    """Guards against affinity overriding what keeps samples moving: a retry after a failure (exclude) must leave
    the group's engine without moving the group; a full engine spills to another; an engine out of rotation moves
    the whole group to a new one."""
    a, b = _dead_url(), _dead_url()

    async def main() -> None:
        router = BuiltinRouter(_cfg([a, b], max_inflight_per_engine=2, failure_threshold=1, cooldown_s=60), None)
        group = GroupAffinity()
        async with router.lease(affinity=group) as home:
            async with router.lease(exclude=(home.engine_id,), affinity=group) as retry:
                assert retry.url != home.url and group.engine_id == home.engine_id
            async with router.lease(affinity=group) as same, router.lease(affinity=group) as spilled:
                assert same.url == home.url and spilled.url != home.url and group.engine_id == home.engine_id
            router.report_failure(home, "connection refused")  # breaker opens: out of rotation
            async with router.lease(affinity=group) as moved:
                assert moved.url != home.url and group.engine_id == moved.engine_id
        await router.close()

    asyncio.run(main())
