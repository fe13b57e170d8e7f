"""`longtrace bench broker`: the broker's throughput against raw redis-py on the same bytes, and msgspec vs JSON.

One run, one Redis (embedded unless a URL is given). Per repetition, `num_groups` realistic groups go
through the broker (publish with a dedup key, read, decode, ack) and through raw redis-py with the same batch
size: pipelined XADD, XREADGROUP, XACK+XDEL in one MULTI, on the broker's own client (so raw gets whatever
connection tuning the broker has). The sides alternate so that noise hits all of them. Reported numbers are
medians over the repetitions; a ratio is the median of the per-repetition ratios broker throughput / raw
throughput.

Two raw baselines, because the broker takes and returns typed messages:
- `ratio` (raw typed): raw redis-py as a user who ships these messages writes it: msgspec-encode each group
  (`msgspec.msgpack.Encoder().encode`) before XADD and decode it (`msgspec.msgpack.Decoder(Group)`) after
  XREADGROUP, inside the timed loop as the broker's are. A baseline that skips either compares the broker's
  codec work against nothing: the codec is not broker overhead, a user of raw redis-py pays it too.
- `ratio_bytes` (raw bytes, the definition before 2026-12-06): the same pre-encoded bytes through raw redis-py,
  no codec on the raw side: a lower bound, the broker's codec counted as its overhead.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from typing import Any

import msgspec
import numpy as np
import redis

from broker.base import ROLLOUTS
from broker.redis import FIELD, RedisBroker
from broker.schemas import (
    Group,
    RewardInfo,
    Sample,
    Task,
    TextSplit,
    WeightSegment,
    decode,
    encode,
    pack_ids,
    pack_logprobs,
)
from broker.settings import BrokerConfig
from common.progress import bar

VOCAB = 151_936  # Qwen3's vocabulary size
CHARS_PER_TOKEN = 4


def _text(rng: np.random.Generator, num_chars: int) -> str:
    letters = rng.integers(ord("a"), ord("z") + 1, size=num_chars, dtype=np.uint8)
    letters[rng.random(num_chars) < 0.18] = ord(" ")
    return letters.tobytes().decode("ascii")


def make_group(
    prompt_tokens: int = 32768,
    num_samples: int = 8,
    response_tokens: int = 4096,
    group_id: str = "g0",
    run_id: str = "bench",
    seed: int = 0,
) -> Group:
    """A group shaped like a real long-context rollout: the prompt once, n samples with text and logprobs."""
    rng = np.random.default_rng(seed)
    task = Task(
        run_id=run_id,
        group_id=group_id,
        dataset_index=seed,
        prompt_ids=pack_ids(rng.integers(0, VOCAB, prompt_tokens)),
        label="Marie Curie",
        reward_info=RewardInfo(
            question="Which physicist, born in Warsaw, won Nobel prizes in two sciences?",
            rubrics=["Warsaw", "Nobel Prize in Physics", "Nobel Prize in Chemistry", "polonium", "radium"],
        ),
        num_samples=num_samples,
        policy_version=3,
        created_s=time.time(),
    )
    samples = []
    for i in range(num_samples):
        text = _text(rng, response_tokens * CHARS_PER_TOKEN)
        cut = len(text) * 9 // 10
        samples.append(
            Sample(
                response_ids=pack_ids(rng.integers(0, VOCAB, response_tokens)),
                logprobs=pack_logprobs(-rng.exponential(0.5, response_tokens)),
                text=text,
                finish_reason="stop",
                status="completed",
                split=TextSplit(cut, cut, len(text)),
                weight_segments=[WeightSegment(0, 3), WeightSegment(response_tokens // 2, 4)],
                engine_id=f"engine-{i % 2}",
                gen_s=12.5,
            )
        )
    return Group(task=task, samples=samples, worker_id="w0", rollout_s=13.0)


def _as_json_doc(group: Group) -> dict[str, Any]:
    """The same group as a JSON document with token ids and logprobs as lists (the baseline wire format)."""
    doc: dict[str, Any] = msgspec.to_builtins(group)
    doc["task"]["prompt_ids"] = group.task.prompt_ids_np().tolist()
    for d, s in zip(doc["samples"], group.samples, strict=True):
        d["response_ids"] = s.response_ids_np().tolist()
        d["logprobs"] = s.logprobs_np().tolist()
    return doc


def _median_us(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _codec_numbers(group: Group, reps: int) -> dict[str, float]:
    payload = encode(group)
    doc = _as_json_doc(group)
    text = json.dumps(doc)
    encode_us = _median_us(lambda: encode(group), reps)
    decode_us = _median_us(lambda: decode(payload, Group), reps)
    json_encode_us = _median_us(lambda: json.dumps(doc), reps)
    json_decode_us = _median_us(lambda: json.loads(text), reps)
    return {
        "encode_us": round(encode_us, 1),
        "decode_us": round(decode_us, 1),
        "json_encode_us": round(json_encode_us, 1),
        "json_decode_us": round(json_decode_us, 1),
        "json_ratio": round((json_encode_us + json_decode_us) / (encode_us + decode_us), 1),
        "json_mb": round(len(text) / 2**20, 3),
    }


def _through_broker(broker: RedisBroker, groups: list[Group], batch: int, rep: int) -> float:
    producer = broker.producer(ROLLOUTS, Group)
    consumer = broker.consumer(ROLLOUTS, Group, "bench", f"broker-{rep}")
    t = time.perf_counter()
    for start in range(0, len(groups), batch):
        chunk = groups[start : start + batch]
        producer.publish(chunk, dedup_key=lambda g: f"{rep}:{g.group_id}")
        got = 0
        while got < len(chunk):
            entries = consumer.read(len(chunk) - got, block_s=5.0)
            assert entries, "the broker returned nothing within 5 s"
            consumer.ack([e.id for e in entries])
            got += len(entries)
    return time.perf_counter() - t


def _through_raw(client: redis.Redis, key: str, items: list[bytes] | list[Group], batch: int, rep: int) -> float:
    """Raw redis-py: `items` are payloads (raw bytes), or groups that are encoded before XADD and decoded after
    XREADGROUP (raw typed)."""
    group = "raw"
    client.xgroup_create(key, group, id="0", mkstream=True)
    consumer = f"raw-{rep}"
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(Group)
    typed = any(isinstance(item, Group) for item in items[:1])
    t = time.perf_counter()
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        pipe = client.pipeline(transaction=False)
        for item in chunk:
            pipe.xadd(key, {FIELD: encoder.encode(item) if isinstance(item, Group) else item})
        pipe.execute()
        got = 0
        while got < len(chunk):
            reply: Any = client.xreadgroup(group, consumer, {key: ">"}, count=len(chunk) - got, block=5000)
            assert reply, "raw XREADGROUP returned nothing within 5 s"
            if typed:
                msgs = [decoder.decode(fields[FIELD]) for _, fields in reply[0][1]]
                assert len(msgs) == len(reply[0][1])
            ids = [i for i, _ in reply[0][1]]
            pipe = client.pipeline(transaction=True)
            pipe.xack(key, group, *ids)
            pipe.xdel(key, *ids)
            pipe.execute()
            got += len(ids)
    elapsed = time.perf_counter() - t
    client.delete(key)
    return elapsed


def _settle_aof(client: redis.Redis, timeout_s: float = 30.0) -> None:
    """With the AOF on, rewrite it now and wait until done, so that no rewrite runs during a timed phase: Redis
    starts one each time the AOF doubled (over 64 MB), i.e. after every other 32 MB phase here, and while it runs
    every write costs more (the rewrite buffer, copy-on-write after the fork). Left to chance it landed on the
    same side in every repetition (two phases of the same size alternate) and decided the ratio."""
    info: Any = client.info("persistence")
    if not info.get("aof_enabled"):
        return
    deadline = time.monotonic() + timeout_s
    while info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled"):  # one already running
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
        info = client.info("persistence")
    client.bgrewriteaof()
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if not (info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled")):
            return
        time.sleep(0.01)


def run_bench(
    redis_url: str,
    prompt_tokens: int = 32768,
    num_samples: int = 8,
    response_tokens: int = 4096,
    num_groups: int = 64,
    batch: int = 8,
    reps: int = 7,
) -> dict[str, Any]:
    """Measure and return the benchmark's JSON object (see the module docstring)."""
    if min(prompt_tokens, num_samples, response_tokens, num_groups, batch, reps) < 1:
        raise ValueError(
            "--prompt-tokens, --num-samples, --response-tokens, --num-groups, --batch, --reps must be >= 1"
        )
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    base = make_group(prompt_tokens, num_samples, response_tokens, run_id=run_id)
    groups = [
        msgspec.structs.replace(base, task=msgspec.structs.replace(base.task, group_id=f"g{i}"))
        for i in range(num_groups)
    ]
    payloads = [encode(g) for g in groups]
    group_mb = len(payloads[0]) / 2**20
    config = BrokerConfig.model_validate(
        {"redis_url": redis_url, "run_id": run_id, "max_backlog": max(256, 2 * batch), "socket_timeout_s": 30.0}
    )
    broker = RedisBroker(config)
    raw_key = broker.key("raw-bench")
    broker_s: list[float] = []
    raw_s: list[float] = []
    bytes_s: list[float] = []
    # the groups of the timed phases (broker, raw typed, raw bytes per repetition), counted between phases: no
    # drawing inside a timed loop
    progress = bar(reps * 3 * num_groups, "bench broker", "group")
    try:
        _through_broker(broker, groups[:batch], batch, -1)  # warm-up: connections, scripts, allocator
        _through_raw(broker.client, raw_key, groups[:batch], batch, -1)
        _through_raw(broker.client, raw_key, payloads[:batch], batch, -1)
        for rep in range(reps):
            _settle_aof(broker.client)
            broker_s.append(_through_broker(broker, groups, batch, rep))
            progress.update(num_groups)
            _settle_aof(broker.client)
            raw_s.append(_through_raw(broker.client, raw_key, groups, batch, rep))
            progress.update(num_groups)
            _settle_aof(broker.client)
            bytes_s.append(_through_raw(broker.client, raw_key, payloads, batch, rep))
            progress.update(num_groups)
    finally:
        progress.close()
        keys = list(broker.client.scan_iter(match=f"longtrace:{{{run_id}}}:*", count=1000))
        if keys:
            broker.client.delete(*keys)
        broker.close()
    groups_per_s = num_groups / statistics.median(broker_s)
    raw_groups_per_s = num_groups / statistics.median(raw_s)
    bytes_groups_per_s = num_groups / statistics.median(bytes_s)
    return {
        "bench": "broker",
        "prompt_tokens": prompt_tokens,
        "num_samples": num_samples,
        "response_tokens": response_tokens,
        "num_groups": num_groups,
        "batch": batch,
        "reps": reps,
        "dedup": True,  # the broker side publishes with dedup keys, as the pipeline does
        "group_mb": round(group_mb, 3),
        "groups_per_s": round(groups_per_s, 1),
        "raw_groups_per_s": round(raw_groups_per_s, 1),  # raw typed (see the module docstring)
        "raw_bytes_groups_per_s": round(bytes_groups_per_s, 1),
        # Median of per-repetition ratios: each pair ran back to back, so slow drift of a shared machine cancels.
        "ratio": round(statistics.median(r / b for b, r in zip(broker_s, raw_s, strict=True)), 3),
        "ratio_bytes": round(statistics.median(r / b for b, r in zip(broker_s, bytes_s, strict=True)), 3),
        "mb_per_s": round(groups_per_s * group_mb, 1),
        "raw_mb_per_s": round(raw_groups_per_s * group_mb, 1),
        **_codec_numbers(base, max(reps, 15)),
    }
