"""Batch assembly: scored groups -> samples, staleness drops, held acks, micro-batch packing (memory broker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from broker.base import DEAD, SCORED
from broker.memory import MemoryBroker
from broker.schemas import DeadLetter, ScoredGroup, pack_logprobs
from broker.settings import BrokerConfig
from learner.batching import (
    Layout,
    TrainSample,
    batch_from_tensors,
    batch_to_tensors,
    build_micro_batch,
    group_to_samples,
    padding_fraction,
    plan_micro_batches,
)
from learner.scored_reader import ScoredReader
from learner.state import LearnerState
from learner.train_config import BatchConfig, DataConfig, LossConfig
from tests.helpers.scored_groups import make_scored as _scored


def _reader(
    broker: MemoryBroker, state: LearnerState, groups_per_step: int = 2, max_staleness: int = 1, zero_var: bool = False
) -> ScoredReader:
    consumer = broker.consumer(SCORED, ScoredGroup, group="learner", name="learner")
    return ScoredReader(
        consumer,
        state,
        DataConfig(groups_per_step=groups_per_step, max_staleness=max_staleness),
        BatchConfig(zero_variance_filter=zero_var),
        LossConfig(),
    )


def test_stale_groups_are_dropped_and_counted_and_entries_held_until_ack() -> None:
    """Guards against training on groups older than v - max_staleness, against not counting the drops, and
    against acking scored entries before the checkpoint (a crash would then lose them)."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://", claim_idle_s=3600))
    producer = broker.producer(SCORED, ScoredGroup)
    producer.publish([_scored("old", 1, [1, 0]), _scored("ok-a", 2, [1, 0]), _scored("ok-b", 3, [0, 1])])
    state = LearnerState(policy_version=3)
    reader = _reader(broker, state, groups_per_step=2, max_staleness=1)
    batch = reader.poll(block_s=0.1)
    assert batch is not None
    assert batch.group_ids == ["ok-a", "ok-b"]
    assert state.num_dropped_stale == 1
    assert all(reader.ledger.is_decided(g) for g in ["old", "ok-a", "ok-b"])
    assert batch.metrics["staleness/1"] == 1 and batch.metrics["staleness/0"] == 1
    assert producer.backlog() == 3  # all held (pending), none acked yet
    assert reader.ack_held() == 3
    assert producer.backlog() == 0


def test_redelivered_group_is_not_trained_twice_and_held_entries_come_back_after_restart() -> None:
    """Guards against retraining a group redelivered after a crash between checkpoint and ack, and against losing
    entries read but not checkpointed: a restarted consumer (same name) must get them back first."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://", claim_idle_s=3600))
    producer = broker.producer(SCORED, ScoredGroup)
    producer.publish([_scored("g1", 0, [1, 0]), _scored("g2", 0, [1, 0])])
    state = LearnerState()
    first = _reader(broker, state, groups_per_step=1)
    assert first.poll(0.1) is not None  # g1 read, held, not acked: then the learner "crashes"
    restarted = _reader(broker, LearnerState(), groups_per_step=1)
    again = restarted.poll(0.1)
    assert again is not None and again.group_ids == ["g1"]  # own pending entry first, nothing lost

    # A checkpointed state that already consumed g1 skips its redelivered copy.
    broker2 = MemoryBroker(BrokerConfig(redis_url="memory://", claim_idle_s=3600))
    broker2.producer(SCORED, ScoredGroup).publish([_scored("g1", 0, [1, 0]), _scored("g2", 0, [0, 1])])
    done = LearnerState(recent_decided=["g1"])
    batch = _reader(broker2, done, groups_per_step=1).poll(0.1)
    assert batch is not None and batch.group_ids == ["g2"]
    assert done.num_duplicates == 1


def test_malformed_group_goes_to_the_dead_stream_and_zero_variance_filter() -> None:
    """Guards against a group whose logprobs do not match its tokens crashing the learner (it must be
    dead-lettered with the reason) and against the zero-variance filter dropping groups when off or keeping them when on."""
    broker = MemoryBroker(BrokerConfig(redis_url="memory://", claim_idle_s=3600))
    bad = _scored("bad", 0, [1, 0])
    bad.group.samples[0].logprobs = pack_logprobs([-1.0])
    broker.producer(SCORED, ScoredGroup).publish([bad, _scored("flat", 0, [0.7, 0.7]), _scored("good", 0, [1, 0])])
    state = LearnerState()
    batch = _reader(broker, state, groups_per_step=1, zero_var=True).poll(0.1)
    assert batch is not None and batch.group_ids == ["good"]
    assert state.groups_dead_lettered == {"invalid": 1} and state.num_dropped_zero_variance == 1
    dead = broker.consumer(DEAD, DeadLetter, group="inspect", name="t").read(10, 0.1)
    assert len(dead) == 1 and "1 logprobs" in dead[0].msg.reason

    kept = MemoryBroker(BrokerConfig(redis_url="memory://", claim_idle_s=3600))
    kept.producer(SCORED, ScoredGroup).publish([_scored("flat", 0, [0.7, 0.7])])
    batch = _reader(kept, LearnerState(), groups_per_step=1).poll(0.1)
    assert batch is not None and batch.group_ids == ["flat"]  # filter off by default (the paper keeps them)
    assert [s.advantage for s in batch.samples] == [0.0, 0.0]


def test_group_to_samples_advantages_and_tokens() -> None:
    """Guards against samples missing the prompt, misaligned rollout logprobs, or advantages not per group."""
    samples = group_to_samples(_scored("g", 0, [1.0, 0.0, 0.0, 0.0], prompt=[5, 6, 7]), LossConfig())
    assert samples[0].tokens.tolist() == [5, 6, 7, 10, 10, 10]
    assert samples[0].prompt_len == 3 and len(samples[0].rollout_logp) == 3
    assert [s.advantage for s in samples] == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)
    sft = group_to_samples(_scored("g", 0, [1.0, 0.0]), LossConfig(mode="sft"))
    assert [s.advantage for s in sft] == [1.0, 1.0]


def test_micro_batch_aligns_labels_mask_advantage_and_rollout_logprobs() -> None:
    """Guards against an off-by-one between a position's label and its loss mask / rollout logprob (the loss
    would then train on the last prompt token or skip the first response token)."""
    s = TrainSample(np.array([1, 2, 3, 4, 5], dtype=np.int32), 2, np.array([-1, -2, -3], dtype=np.float32), 0.5)
    short = TrainSample(np.array([7, 8], dtype=np.int32), 1, np.array([-4], dtype=np.float32), -1.0)
    mb = build_micro_batch([s, short], [0, 1], Layout(pad_multiple=8))
    assert mb.input_ids_BS.shape == (2, 8)
    assert mb.input_ids_BS[0, :4].tolist() == [1, 2, 3, 4]
    assert mb.labels_BS[0, :4].tolist() == [2, 3, 4, 5]
    assert mb.loss_mask_BS[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert mb.rollout_logp_BS[0, 1:4].tolist() == [-1, -2, -3]
    assert mb.advantages_BS[0].tolist() == [0, 0.5, 0.5, 0.5, 0, 0, 0, 0]
    assert mb.loss_mask_BS[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0] and mb.labels_BS[1, 0] == 8
    assert mb.num_loss_tokens == 4


def test_plan_balances_ranks_respects_the_budget_and_is_deterministic() -> None:
    """Guards against a sample being dropped or duplicated by packing, a micro-batch exceeding the token budget,
    unbalanced DP ranks, and plans differing between ranks (every rank must compute the same plan)."""
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 200, size=37)] + [1000]  # one longer than the budget
    plan = plan_micro_batches(lengths, dp_size=2, max_tokens=512, layout=Layout(pad_multiple=8))
    assert plan == plan_micro_batches(lengths, dp_size=2, max_tokens=512, layout=Layout(pad_multiple=8))
    flat = sorted(i for rank in plan for mb in rank for i in mb)
    assert flat == list(range(len(lengths)))
    for rank in plan:
        for mb in rank:
            padded = -(-max(lengths[i] for i in mb) // 8) * 8
            assert len(mb) * padded <= 512 or mb == [len(lengths) - 1]
    loads = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    with pytest.raises(ValueError, match="data-parallel"):
        plan_micro_batches([5], dp_size=2, max_tokens=64, layout=Layout(pad_multiple=1))


def test_packed_micro_batch_keeps_each_sequence_and_its_boundaries() -> None:
    """Guards against packing (THD) misplacing a sequence: labels, loss mask and rollout logprobs must sit where
    the padded layout puts them, `cu_seqlens` must delimit the sequences (attention would otherwise cross them),
    positions must restart per sequence, and the row's padding must go to the last sequence's slot."""
    a = TrainSample(np.array([1, 2, 3, 4, 5], dtype=np.int32), 2, np.array([-1, -2, -3], dtype=np.float32), 0.5)
    b = TrainSample(np.array([7, 8, 9], dtype=np.int32), 1, np.array([-4, -5], dtype=np.float32), -1.0)
    padded = build_micro_batch([a, b], [0, 1], Layout(pad_multiple=1))
    packed = build_micro_batch([a, b], [0, 1], Layout(pad_multiple=8, packing=True))
    assert packed.input_ids_BS.shape == (1, 8) and packed.cu_seqlens is not None
    assert packed.cu_seqlens.tolist() == [0, 4, 8]  # b's slot: its 2 inputs and the row's 2 padding tokens
    for row, start, n in ((0, 0, 4), (1, 4, 2)):
        for name in ("input_ids_BS", "labels_BS", "loss_mask_BS", "advantages_BS", "rollout_logp_BS"):
            got = getattr(packed, name)[0, start : start + n].tolist()
            assert got == getattr(padded, name)[row, :n].tolist(), name
    assert packed.position_ids_BS[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert packed.num_loss_tokens == padded.num_loss_tokens == 5


def test_cp_shards_are_the_zigzag_chunks_and_cover_every_token_once() -> None:
    """Guards the context-parallel split: every token must land on exactly one CP rank, each rank holding chunk r
    and chunk 2cp-1-r of every sequence (megatron's rotary embedding assumes that order), in both layouts, and a
    sequence must be padded to a multiple of 2 x cp (else the chunks are unequal and ranks disagree on shapes)."""
    samples = [
        TrainSample(np.arange(1, 12, dtype=np.int32), 3, np.full(8, -1.0, dtype=np.float32), 1.0),
        TrainSample(np.arange(20, 26, dtype=np.int32), 2, np.full(4, -1.0, dtype=np.float32), -1.0),
    ]
    for packing in (False, True):
        lay = Layout(pad_multiple=1, packing=packing, cp_size=2)
        mb = build_micro_batch(samples, [0, 1], lay)
        shards = [mb.shard_for_cp(2, r) for r in range(2)]
        for name in ("input_ids_BS", "loss_mask_BS"):
            whole = getattr(mb, name)
            assert sum(getattr(sh, name).numel() for sh in shards) == whole.numel()
            assert sum(float(getattr(sh, name).sum()) for sh in shards) == float(whole.sum())
        if not packing:  # padded: 10 inputs -> 12 (multiple of 4), chunks of 3: rank 0 holds chunks 0 and 3
            assert mb.input_ids_BS.shape[1] == 12
            assert shards[0].input_ids_BS[0].tolist() == [1, 2, 3, 10, 0, 0]
            assert shards[1].input_ids_BS[0].tolist() == [4, 5, 6, 7, 8, 9]
        else:  # packed: slots 12 and 8 (5 inputs -> 8); rank 1 holds chunks 1, 2 of each
            assert mb.cu_seqlens is not None and mb.cu_seqlens.tolist() == [0, 12, 20]
            assert shards[1].input_ids_BS[0].tolist() == [4, 5, 6, 7, 8, 9, 22, 23, 24, 0]
            assert shards[0].cu_seqlens is not None and shards[0].cu_seqlens.tolist() == [0, 12, 20]


def test_packing_wastes_less_padding_and_plans_within_the_budget() -> None:
    """Guards the padding-waste metric and the packed plan: packing must pad less than the padded layout on
    ragged lengths, a packed micro-batch must stay within the token budget, and the metric must see padding
    (a padded layout over ragged lengths wastes some)."""
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(5, 300, size=40)]
    padded, packed = Layout(pad_multiple=8), Layout(pad_multiple=8, packing=True)
    plan_padded = plan_micro_batches(lengths, dp_size=2, max_tokens=1024, layout=padded)
    plan_packed = plan_micro_batches(lengths, dp_size=2, max_tokens=1024, layout=packed)
    waste_padded = padding_fraction(lengths, plan_padded, padded)
    waste_packed = padding_fraction(lengths, plan_packed, packed)
    assert waste_padded > 0.1 and waste_packed < 0.02, (waste_padded, waste_packed)
    assert all(sum(packed.slots([lengths[i] for i in mb])) <= 1024 for rank in plan_packed for mb in rank)
    assert sum(len(mb) for rank in plan_packed for mb in rank) == len(lengths)


def test_batch_wire_round_trip() -> None:
    """Guards against the rank-0 -> all-ranks encoding losing tokens, prompt boundaries, advantages or logprobs."""
    sg = [_scored("a", 0, [1, 0], prompt=[1, 2, 3]), _scored("b", 0, [0, 1], resp_len=5)]
    from learner.batching import build_batch

    batch = build_batch(sg, [0, 0], LossConfig())
    meta, tensors = batch_to_tensors(batch)
    back = batch_from_tensors(meta, {k: v.clone() for k, v in tensors.items()})
    assert back.group_ids == ["a", "b"] and back.metrics == batch.metrics
    for x, y in zip(batch.samples, back.samples, strict=True):
        assert x.tokens.tolist() == y.tokens.tolist() and x.prompt_len == y.prompt_len
        assert x.advantage == y.advantage and torch.equal(
            torch.from_numpy(x.rollout_logp), torch.from_numpy(y.rollout_logp)
        )
    assert batch.metrics["accuracy"] == pytest.approx(0.5)


def test_step_metrics_carry_the_rollout_and_reward_timings_of_their_groups() -> None:
    """Guards against the trackers missing the rollout and reward side of a step (issue 24: rollout and reward
    metrics land in the learner's run): the timings the workers stamped on each group must reach the step's metrics,
    and SFT steps, whose demonstrations were never generated or scored, must drop them with the rewards."""
    import msgspec

    from learner.batching import REWARD_METRICS, group_metrics

    a, b = _scored("a", 0, [1.0, 0.0]), _scored("b", 0, [0.0, 1.0])
    a = msgspec.structs.replace(a, score_s=0.5, group=msgspec.structs.replace(a.group, rollout_s=2.0))
    b = msgspec.structs.replace(b, score_s=1.5, group=msgspec.structs.replace(b.group, rollout_s=4.0))
    resumed = msgspec.structs.replace(b.group.samples[0], num_resumes=2)
    b = msgspec.structs.replace(b, group=msgspec.structs.replace(b.group, samples=[resumed, b.group.samples[1]]))
    m = group_metrics([a, b], [0, 1])
    assert (m["rollout/group_s_mean"], m["rollout/group_s_max"], m["reward/score_s_mean"]) == (3.0, 4.0, 1.0)
    assert m["rollout/resumes_per_sample"] == 0.5
    assert {"rollout/group_s_mean", "rollout/resumes_per_sample", "reward/score_s_mean"} <= REWARD_METRICS


def test_packing_matches_first_fit_decreasing_over_the_layouts_own_token_count() -> None:
    """Guards against the O(1) fit test of pack_micro_batches drifting from `Layout.slots` (the tokens a micro-batch
    really takes): it must pack exactly as first-fit decreasing over `sum(layout.slots(...))` does, for padded and
    packed rows, with and without context parallelism, and never exceed the budget with two or more sequences."""
    import random

    from learner.batching import Layout, pack_micro_batches

    def reference(indices: list[int], lengths: list[int], max_tokens: int, layout: Layout) -> list[list[int]]:
        bins: list[list[int]] = []
        for i in sorted(indices, key=lambda i: (-lengths[i], i)):
            for b in bins:
                if sum(layout.slots([lengths[j] for j in [*b, i]])) <= max_tokens:
                    b.append(i)
                    break
            else:
                bins.append([i])
        return bins

    rng = random.Random(0)
    for trial in range(300):
        layout = Layout(pad_multiple=rng.choice([1, 8, 64]), packing=rng.random() < 0.5, cp_size=rng.choice([1, 2, 4]))
        lengths = [rng.randint(1, 700) for _ in range(rng.randint(1, 40))]
        budget = rng.choice([256, 1024, 4096])
        got = pack_micro_batches(list(range(len(lengths))), lengths, budget, layout)
        assert got == reference(list(range(len(lengths))), lengths, budget, layout), (trial, layout)
        assert all(len(mb) == 1 or sum(layout.slots([lengths[i] for i in mb])) <= budget for mb in got)
