"""Routing replay's transport (broker/routing.py): the rollout worker asks the engine for each
sample's routed experts, stores them in Redis beside the group (one key per sample, with a TTL) and the entry
names the key; the learner's scored reader fetches them into TrainSample.routed_experts, dead-letters a group whose
routing is missing or misshapen, and deletes the keys once the group's entry is acked. Real Redis
(tests/conftest.py); one test runs a real worker against the built-in engine serving the tiny MoE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import redis

from broker.base import DEAD, ROLLOUTS, SCORED, TASKS, Broker
from broker.factory import connect
from broker.routing import RoutingStore, encode_routing, routing_store
from broker.schemas import DeadLetter, Group, SampleReward, ScoredGroup, decode, encode, pack_ids
from broker.settings import BrokerConfig
from common.config import load_config
from learner.ledger import GroupLedger
from learner.scored_reader import CONSUMER_GROUP, ScoredReader
from learner.state import LearnerState
from learner.train_config import BatchConfig, DataConfig, LossConfig
from rollout_server.worker.config import RolloutConfig
from rollout_server.worker.metrics import RolloutMetrics
from rollout_server.worker.router import build_router
from rollout_server.worker.worker import RolloutWorker
from tests.helpers.moe_models import NUM_EXPERTS, TOP_K, tiny_moe_model
from tests.helpers.scored_groups import make_scored

RUN_ID = "routing-it"
LAYERS = 3  # of the hand-made routing (the tiny MoE has 2)


def _cfg(redis_url: str, *extra: str) -> RolloutConfig:
    return load_config(
        RolloutConfig,
        overrides=[
            f"--broker.redis_url={redis_url}",
            f"--broker.run_id={RUN_ID}",
            "--broker.block_s=0.2",
            "--sampling.routing_replay=true",
            "--sampling.routing_ttl_s=600",
            *extra,
        ],
    )


@pytest.fixture
def broker(redis_url: str) -> Iterator[Broker]:
    b = connect(BrokerConfig.model_validate({"redis_url": redis_url, "run_id": RUN_ID, "block_s": 0.2}))
    try:
        yield b
    finally:
        b.close()


def _reader(
    broker: Broker, store: RoutingStore | None, shape: tuple[int, int] = (LAYERS, TOP_K), groups_per_step: int = 1
) -> ScoredReader:
    state = LearnerState()
    consumer = broker.consumer(SCORED, ScoredGroup, group=CONSUMER_GROUP, name="rank0")
    data = DataConfig.model_validate({"groups_per_step": groups_per_step, "max_staleness": 4})
    batch = BatchConfig.model_validate({"zero_variance_filter": False, "due_wait_s": 0})
    return ScoredReader(
        consumer, state, data, batch, LossConfig(), GroupLedger(state), routing=store, routing_shape=shape
    )


def _routing(num_inputs: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, size=(num_inputs, LAYERS, TOP_K), dtype=np.int32)


def _scored(group: Group) -> ScoredGroup:
    rewards = [SampleReward(reward=float(i), outcome_reward=0.0, rubric_reward=0.0) for i in range(len(group.samples))]
    return ScoredGroup(group=group, rewards=rewards)


def _dead_letters(broker: Broker) -> list[DeadLetter]:
    return [e.msg for e in broker.view(DEAD).peek(DeadLetter).entries]


def test_published_routing_reaches_train_samples_bit_exact_and_the_entry_stays_small(
    broker: Broker, redis_url: str
) -> None:
    """Guards against routing put inside the queue entry (tens of MB per sample at long context), routing written
    after the publish (a reader racing the write), bytes garbled or reshaped wrongly on the way to
    TrainSample.routed_experts, a redelivered task's regeneration overwriting the routing the published entry names,
    and keys left behind once the learner acked the group."""
    cfg = _cfg(redis_url)
    worker = RolloutWorker(cfg, broker, build_router(cfg, broker), RolloutMetrics(), "w")
    prompt, resp_lens = [1, 2, 3, 4], [3, 9]  # make_scored's responses are 3 tokens: the second is made longer
    sg = make_scored("g0", 0, [0.0, 1.0], prompt=prompt, run_id=RUN_ID)
    sg.group.samples[1] = msgspec.structs.replace(sg.group.samples[1], response_ids=pack_ids([7] * resp_lens[1]))
    sg.group.samples[1].logprobs = np.full(resp_lens[1], -0.5, dtype="<f4").tobytes()
    group = sg.group
    routed = [_routing(len(prompt) + n - 1, seed) for seed, n in enumerate(resp_lens)]
    bare = len(encode(group))
    producer = broker.producer(ROLLOUTS, Group)

    async def publish(g: Group, r: list[np.ndarray]) -> tuple[list[str], str]:
        keys = await worker._store_routing(g, [a.tobytes() for a in r])  # noqa: SLF001
        published = await worker._publish(producer, g)  # noqa: SLF001
        if published != "published":
            await worker._drop_routing(keys)  # noqa: SLF001  # what _handle does
        return keys, published

    keys, published = asyncio.run(publish(group, routed))
    assert published == "published" and [s.routing_key for s in group.samples] == keys
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    for k in keys:
        assert k.startswith(f"longtrace:{{{RUN_ID}}}:routing:g0:") and 0 < client.pttl(k) <= 600_000
    assert [client.strlen(k) for k in keys] == [1 + a.size for a in routed]  # ids < 64: one byte each
    # The entry grew by the key names only, not by the routing (67 + 103 bytes stored here, MBs in real runs).
    [entry] = broker.consumer(ROLLOUTS, Group, "test", "test").read(1, 1.0)
    assert len(encode(entry.msg)) - bare <= sum(len(k) + 2 for k in keys)
    assert len(encode(entry.msg)) < bare + sum(a.nbytes for a in routed)

    # A redelivered task generated again: its routing goes under new keys, deleted since the publish is a duplicate.
    again = msgspec.structs.replace(group, samples=[msgspec.structs.replace(s) for s in group.samples])
    keys2, published2 = asyncio.run(publish(again, [r + 1 for r in routed]))
    assert published2 == "duplicate" and set(keys2).isdisjoint(keys)
    assert client.exists(*keys2) == 0 and client.exists(*keys) == len(keys)

    broker.producer(SCORED, ScoredGroup).publish([_scored(entry.msg)])
    reader = _reader(broker, routing_store(broker))
    batch = reader.poll(2.0)
    assert batch is not None and len(batch.samples) == 2
    for s, want in zip(batch.samples, routed, strict=True):
        assert s.routed_experts is not None and s.routed_experts.shape == (s.num_inputs, LAYERS, TOP_K)
        np.testing.assert_array_equal(s.routed_experts, want)
    assert client.exists(*keys) == len(keys), "deleted before the checkpoint acked the entry: a restart loses it"
    assert reader.ack_held() == 1
    assert client.exists(*keys) == 0
    client.close()


def _published_with(broker: Broker, sg: ScoredGroup) -> None:
    broker.producer(SCORED, ScoredGroup).publish([sg])


def test_a_missing_routing_key_dead_letters_the_group(broker: Broker) -> None:
    """Guards against training a group without replay while replay is on (its routing expired past
    routing_ttl_s or was never written), or crashing the learner on it: the group is dead-lettered, the reason
    naming the key, and the step is filled by the next group."""
    store = routing_store(broker)
    bad, good = make_scored("bad", 0, [0.0, 1.0], run_id=RUN_ID), make_scored("good", 0, [0.0, 1.0], run_id=RUN_ID)
    for sg in (bad, good):
        keys = store.new_keys(sg.group_id, 2)
        for s, k in zip(sg.group.samples, keys, strict=True):
            s.routing_key = k
        if sg is good:  # prompt 2 + response 3 tokens: 4 inputs
            store.put({k: encode_routing(_routing(4, i).tobytes()) for i, k in enumerate(keys)}, 60)
    missing = bad.group.samples[0].routing_key
    _published_with(broker, bad)
    _published_with(broker, good)
    reader = _reader(broker, store)
    batch = reader.poll(3.0)
    assert batch is not None and batch.group_ids == ["good"]
    [letter] = _dead_letters(broker)
    assert letter.group_id == "bad" and "routing replay" in letter.reason and f"{missing} is missing" in letter.reason
    assert reader.ledger.is_decided("bad")


def test_misshapen_or_absent_routing_dead_letters_the_group(broker: Broker) -> None:
    """Guards against replaying routing that does not fit the sample (another sample's, a truncated write: expert
    ids applied to the wrong tokens) and against a group generated without --sampling.routing_replay being trained
    unreplayed: both are dead-lettered with their reason."""
    store = routing_store(broker)
    short = make_scored("short", 0, [0.0, 1.0], run_id=RUN_ID)
    keys = store.new_keys("short", 2)
    for s, k in zip(short.group.samples, keys, strict=True):
        s.routing_key = k
    short_values = [encode_routing(_routing(4, 0).tobytes()), encode_routing(_routing(4, 1)[:3].tobytes())]
    store.put(dict(zip(keys, short_values, strict=True)), 60)  # the second one token short
    plain = make_scored("plain", 0, [0.0, 1.0], run_id=RUN_ID)  # no routing keys at all
    _published_with(broker, short)
    _published_with(broker, plain)
    reader = _reader(broker, store)
    assert reader.poll(1.5) is None
    letters = {d.group_id: d.reason for d in _dead_letters(broker)}
    assert "do not fit 4 input tokens x 3 moe layers x top-2" in letters["short"]
    assert "carry no routing key" in letters["plain"]
    assert store.get(keys) == [None, None], "a dead-lettered group's routing is deleted with it"


def test_entries_without_the_routing_field_still_decode() -> None:
    """Guards against the new optional field breaking entries written before it (they would be dead-lettered as
    undecodable during an upgrade): a Sample without `routing_key` decodes with None."""
    group = make_scored("old", 0, [1.0]).group
    builtins = msgspec.to_builtins(group, builtin_types=(bytes,))
    for s in builtins["samples"]:
        del s["routing_key"]
    old = decode(msgspec.msgpack.encode(builtins), Group)
    assert old.samples[0].routing_key is None and old.samples[0].response_ids == group.samples[0].response_ids


def test_worker_stores_the_engines_routing_of_each_sample(redis_url: str, broker: Broker, tmp_path: Path) -> None:
    """Guards the whole rollout path with a real engine: the worker asks the built-in engine serving the tiny MoE
    for `return_routed_experts`, and the learner gets every sample's routing as [prompt + response - 1, moe layers,
    top-k] valid expert ids, equal to the bytes the worker stored (a routing dropped, cut to the last request, or
    keyed to the wrong sample would not be)."""
    from rollout_server.engine.api import build_app
    from rollout_server.engine.config import EngineConfig
    from rollout_server.engine.engine import Engine
    from rollout_server.engine.server import BackgroundServer
    from tests.helpers.scored_groups import make_scored as _make

    model = tiny_moe_model(tmp_path / "moe")
    engine = Engine(EngineConfig(model_path=str(model), max_running_requests=4, context_length=256))
    engine.start()
    try:
        with BackgroundServer(build_app(engine)) as srv:
            cfg = _cfg(
                redis_url,
                f"--engines.urls=[{srv.url!r}]".replace("'", '"'),
                "--engines.use_registry=false",
                "--sampling.max_response_len=6",
                "--sampling.ignore_eos=true",
                "--sampling.stop_token_ids=[]",
            )
            task = _make("g0", 0, [0.0], prompt=[5, 17, 42, 99, 3], run_id=RUN_ID).group.task
            task = msgspec.structs.replace(task, num_samples=2)

            async def run() -> Group:
                router = build_router(cfg, broker)
                await router.start()
                stop = asyncio.Event()
                worker = asyncio.create_task(RolloutWorker(cfg, broker, router, RolloutMetrics(), "w").run(stop))
                await asyncio.to_thread(broker.producer(TASKS, type(task)).publish, [task])
                reader = broker.consumer(ROLLOUTS, Group, "test", "test")
                deadline = time.monotonic() + 120
                try:
                    while True:
                        assert time.monotonic() < deadline and not worker.done(), worker
                        if got := await asyncio.to_thread(reader.read, 1, 0.2):
                            return got[0].msg
                finally:
                    stop.set()
                    await worker
                    await router.close()

            group = asyncio.run(run())
    finally:
        engine.shutdown()
    keys = [s.routing_key for s in group.samples]
    assert len(group.samples) == 2 and all(k is not None for k in keys)
    stored = routing_store(broker).get([k for k in keys if k is not None])
    _published_with(broker, _scored(group))
    batch = _reader(broker, routing_store(broker), (2, TOP_K)).poll(3.0)
    assert batch is not None
    for s, raw in zip(batch.samples, stored, strict=True):
        assert s.response_len == 6 and s.routed_experts is not None and raw is not None
        assert s.routed_experts.shape == (len(s.tokens) - 1, 2, TOP_K)
        assert ((s.routed_experts >= 0) & (s.routed_experts < NUM_EXPERTS)).all()
        assert len(raw) == 1 + s.routed_experts.size  # one byte per expert id (8 experts), not SGLang's four
        np.testing.assert_array_equal(s.routed_experts.ravel(), np.frombuffer(raw, dtype=np.uint8, offset=1))


def test_the_in_process_broker_keeps_routing_for_every_broker_over_its_store() -> None:
    """Guards `memory://` runs (unit tests, the local launcher's in-process services) with routing replay: a worker's
    and a learner's brokers over one MemoryStore see the same routing, which expires by its TTL and is deleted."""
    from broker.memory.backend import MemoryBroker

    worker_side = MemoryBroker()
    learner_side = MemoryBroker(store=worker_side.store)
    put, get = routing_store(worker_side), routing_store(learner_side)
    keys = put.new_keys("g0", 2)
    put.put({keys[0]: b"\x01\x00\x00\x00", keys[1]: b"\x02\x00\x00\x00"}, 0.2)
    assert get.get(keys) == [b"\x01\x00\x00\x00", b"\x02\x00\x00\x00"]
    get.delete(keys[:1])
    assert put.get(keys) == [None, b"\x02\x00\x00\x00"]
    time.sleep(0.25)
    assert get.get(keys) == [None, None]
