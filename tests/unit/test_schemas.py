"""The wire schema (round trips, typed decode errors) and config loading errors that name the flag."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.schemas import (
    SCHEMA_VERSION,
    DeadLetter,
    Group,
    RewardInfo,
    Sample,
    SampleReward,
    SamplingParams,
    SchemaError,
    ScoredGroup,
    Task,
    TextSplit,
    WeightSegment,
    decode,
    encode,
    pack_ids,
    pack_logprobs,
)
from broker.settings import BrokerConfig
from common.config import BaseConfig, ConfigError, load_config

ints32 = st.lists(st.integers(-(2**31), 2**31 - 1), max_size=24)
# Any float32 bit pattern, NaN included: buffers must round-trip bit-exactly.
floats32 = st.lists(st.floats(width=32), max_size=24)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
text = st.text(max_size=12)

tasks = st.builds(
    Task,
    run_id=text,
    group_id=text,
    dataset_index=st.integers(0, 2**40),
    epoch=st.integers(0, 1000),
    prompt_ids=ints32.map(pack_ids),
    label=text,
    reward_info=st.builds(RewardInfo, question=text, rubrics=st.lists(text, max_size=5), dataset_name=text),
    sampling=st.builds(
        SamplingParams, max_new_tokens=st.integers(1, 2**17), temperature=finite, stop=st.lists(text, max_size=3)
    ),
    num_samples=st.integers(1, 64),
    policy_version=st.integers(-1, 10**6),
    created_s=finite,
)
# A text of reasoning + separator + content + stop, and its split (or none).
split_texts = st.tuples(text, text, text, text, st.booleans()).map(
    lambda p: (
        "".join(p[:4]),
        TextSplit(len(p[0]), len(p[0] + p[1]), len(p[0] + p[1] + p[2])) if p[4] else None,
    )
)
samples = split_texts.flatmap(
    lambda ts: st.builds(
        Sample,
        response_ids=ints32.map(pack_ids),
        logprobs=floats32.map(pack_logprobs),
        text=st.just(ts[0]),
        finish_reason=st.sampled_from(["stop", "length", "abort"]),
        status=st.sampled_from(["completed", "truncated", "aborted"]),
        split=st.just(ts[1]),
        ill_formed=st.booleans(),
        weight_segments=st.lists(st.builds(WeightSegment, st.integers(0, 10**6), st.integers(-1, 10**6)), max_size=4),
        engine_id=text,
        num_resumes=st.integers(0, 10),
        gen_s=finite,
    )
)
groups = st.builds(Group, task=tasks, samples=st.lists(samples, max_size=3), worker_id=text, rollout_s=finite)
rewards = st.builds(SampleReward, reward=finite, outcome_reward=finite, rubric_reward=finite, zeroed_reason=text)
scored = st.builds(ScoredGroup, group=groups, rewards=st.lists(rewards, max_size=3), scorer_id=text, score_s=finite)
dead = st.builds(
    DeadLetter,
    stream=text,
    entry_id=text,
    reason=text,
    delivery_count=st.integers(0, 100),
    payload=st.binary(max_size=256),
    consumer=text,
    created_s=finite,
)


@settings(max_examples=40, deadline=None)
@given(st.one_of(tasks, groups, scored, dead))
def test_every_message_round_trips(msg: Task | Group | ScoredGroup | DeadLetter) -> None:
    """Guards against an encode/decode pair that loses or alters any field of any message type."""
    assert decode(encode(msg), type(msg)) == msg


def test_group_version_is_the_oldest_segment_else_the_admission_version() -> None:
    """Guards against readers deriving a group's policy version differently (the learner's staleness, the async
    bench, eval): the oldest version among its samples' weight segments, a sample without tokens ignored, and the
    task's admission version when no sample recorded any (the group is at least that old)."""

    def sample(*segments: tuple[int, int]) -> Sample:
        return Sample(
            response_ids=pack_ids([]), logprobs=pack_logprobs([]), text="", finish_reason="stop", status="completed",
            weight_segments=[WeightSegment(*seg) for seg in segments],
        )  # fmt: skip

    task = Task(
        run_id="r", group_id="g", dataset_index=0, prompt_ids=pack_ids([1]), label="", reward_info=RewardInfo(question="q"),
        policy_version=3,
    )  # fmt: skip
    group = Group(task=task, samples=[sample((0, 5), (4, 7)), sample(), sample((0, 6))])
    assert [s.oldest_policy_version for s in group.samples] == [5, None, 6]
    assert group.group_version == 5
    assert Group(task=task, samples=[sample(), sample()]).group_version == 3
    assert Group(task=task, samples=[]).group_version == 3
    assert decode(encode(group), Group).samples[0].weight_segments[1] == WeightSegment(start=4, policy_version=7)


@settings(max_examples=40, deadline=None)
@given(ints32, floats32)
def test_numpy_buffers_round_trip_bit_exactly(ids: list[int], logprobs: list[float]) -> None:
    """Guards against token ids or logprobs changing (dtype, byte order, NaN payloads) on the wire."""
    sample = Sample(
        response_ids=pack_ids(ids), logprobs=pack_logprobs(logprobs), text="", finish_reason="stop", status="completed"
    )
    back = decode(
        encode(
            Group(
                task=Task(
                    run_id="r",
                    group_id="g",
                    dataset_index=0,
                    prompt_ids=pack_ids(ids),
                    label="",
                    reward_info=RewardInfo(question="q"),
                    policy_version=0,
                ),
                samples=[sample],
            )
        ),
        Group,
    )
    np.testing.assert_array_equal(back.samples[0].response_ids_np(), np.asarray(ids, dtype=np.int32))
    assert back.samples[0].logprobs_np().tobytes() == np.asarray(logprobs, dtype=np.float32).tobytes()
    assert back.task.prompt_ids_np().dtype == np.dtype("<i4")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
@example(b"\x81\xa2\xff\xfe\x01")  # a map key that is not UTF-8: msgspec raised UnicodeDecodeError
@example(b"\x81\xa4type\xa2\xff\xfe")
def test_garbage_bytes_raise_schema_error(data: bytes) -> None:
    """Guards against malformed payloads raising something other than SchemaError (the consumer would crash)."""
    with pytest.raises(SchemaError):
        decode(data, Group)


def _task() -> Task:
    return Task(
        run_id="r",
        group_id="g",
        dataset_index=0,
        prompt_ids=pack_ids([1, 2]),
        label="x",
        reward_info=RewardInfo(question="q"),
        policy_version=0,
    )


def test_wrong_message_type_raises_schema_error() -> None:
    """Guards against a Task on the Group stream decoding into something half-valid."""
    with pytest.raises(SchemaError, match="cannot decode Group"):
        decode(encode(_task()), Group)


def test_other_schema_version_raises_schema_error() -> None:
    """Guards against silently accepting payloads written by an incompatible producer version."""
    future = msgspec.structs.replace(_task(), schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(SchemaError, match="schema_version"):
        decode(encode(future), Task)


def _parsed_sample(reasoning: str, content: str) -> Sample:
    text = f"{reasoning}\n</think>\n\n{content}<|im_end|>"
    return Sample(
        response_ids=pack_ids([1, 2, 3]), logprobs=pack_logprobs([-0.5] * 3), text=text, finish_reason="stop",
        status="completed", split=TextSplit.of(text, reasoning, content),
    )  # fmt: skip


def test_a_sample_carries_its_text_once() -> None:
    """Guards against the wire storing a sample's text three times (issue 19, defect 4: `text`, then `reasoning`
    and `content`, the processor's split of it), which tripled the entry size of long generations, and against
    the reasoning and content the readers use (reward, eval, ablation) changing on the way."""
    reasoning, content = "R" * 30_000 + " thought", "Answer: Paris " * 1000
    sample = _parsed_sample(reasoning, content)
    wire = encode(Group(task=_task(), samples=[sample]))
    assert wire.count(b"R" * 30_000) == 1 and wire.count(b"Answer: Paris " * 1000) == 1
    assert len(wire) < len(sample.text.encode()) + 1024  # the rest: the task, ids, field names
    back = decode(wire, Group).samples[0]
    assert (back.reasoning, back.content) == (reasoning, content)
    unsplit = Sample(
        response_ids=b"", logprobs=b"", text="cut off </think>", finish_reason="length", status="truncated"
    )
    assert (unsplit.reasoning, unsplit.content) == ("", "")


def test_a_split_that_does_not_fit_its_text_is_refused() -> None:
    """Guards against offsets that point outside the text (a foreign or corrupt producer) decoding into a sample
    whose reasoning or content is silently cut: the consumer must dead-letter it, and no producer can build it."""
    doc = msgspec.msgpack.decode(encode(Group(task=_task(), samples=[_parsed_sample("r", "c")])))
    doc["samples"][0]["split"] = [1, 5, 99]
    with pytest.raises(SchemaError, match="does not fit a text of"):
        decode(msgspec.msgpack.encode(doc), Group)
    with pytest.raises(ValueError, match="does not fit"):
        Sample(response_ids=b"", logprobs=b"", text="abc", finish_reason="stop", status="completed",
               split=TextSplit(2, 1, 3))  # fmt: skip
    with pytest.raises(ValueError, match="does not begin the text"):
        TextSplit.of("abc", "x", "c")
    with pytest.raises(ValueError, match="not in the text"):
        TextSplit.of("abc", "a", "z")


def test_a_version_1_group_is_refused_not_misread() -> None:
    """Guards against an entry written before the split (schema 1: `reasoning` and `content` as strings) being
    read with an empty answer, which the reward would score 0: it is undecodable, so the consumer dead-letters it."""
    doc = msgspec.msgpack.decode(encode(Group(task=_task(), samples=[_parsed_sample("r", "c")])))
    doc["schema_version"] = doc["task"]["schema_version"] = 1
    del doc["samples"][0]["split"]
    doc["samples"][0] |= {"reasoning": "r", "content": "c"}
    with pytest.raises(SchemaError, match="unknown field `reasoning`"):
        decode(msgspec.msgpack.encode(doc), Group)
    old_task = msgspec.msgpack.decode(encode(_task())) | {"schema_version": 1}
    with pytest.raises(SchemaError, match="schema_version 1, expected 2"):
        decode(msgspec.msgpack.encode(old_task), Task)


def test_truncated_and_unknown_field_payloads_raise_schema_error() -> None:
    """Guards against a cut-off payload or one with unexpected fields being half-decoded."""
    data = encode(_task())
    with pytest.raises(SchemaError):
        decode(data[:-5], Task)
    doc = msgspec.msgpack.decode(data)
    doc["surprise"] = 1
    with pytest.raises(SchemaError, match="surprise"):
        decode(msgspec.msgpack.encode(doc), Task)


class _ServiceConfig(BaseConfig):
    broker: BrokerConfig = BrokerConfig.model_validate({})
    """The broker section."""
    name: str = "svc"
    """A name."""


def test_config_unknown_key_in_file_names_the_key(tmp_path: Path) -> None:
    """Guards against a typo in a TOML file being silently ignored."""
    path = tmp_path / "c.toml"
    path.write_text("[broker]\nmax_backlgo = 3\n")
    with pytest.raises(ConfigError, match=r"--broker\.max_backlgo"):
        load_config(_ServiceConfig, path)


def test_config_bad_toml_and_missing_file_name_the_flag(tmp_path: Path) -> None:
    """Guards against a raw tomllib traceback (or a silent default config) for a broken or missing file."""
    path = tmp_path / "bad.toml"
    path.write_text("[broker\nx = 1\n")
    with pytest.raises(ConfigError, match="--config .*invalid TOML"):
        load_config(_ServiceConfig, path)
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(_ServiceConfig, tmp_path / "missing.toml")


def test_config_bad_value_and_unknown_override_name_the_flag(tmp_path: Path) -> None:
    """Guards against invalid override values being accepted, or errors that do not say which flag."""
    path = tmp_path / "c.toml"
    path.write_text('name = "from-file"\n[broker]\nmax_backlog = 7\n')
    config = load_config(_ServiceConfig, path, ["--broker.run-id", "run9", "--broker.block_s=0.5"])
    assert (config.name, config.broker.max_backlog, config.broker.run_id, config.broker.block_s) == (
        "from-file",
        7,
        "run9",
        0.5,
    )
    with pytest.raises(ConfigError, match=r"--broker\.max_backlog"):
        load_config(_ServiceConfig, path, ["--broker.max_backlog", "0"])
    with pytest.raises(ConfigError, match=r"--broker\.nope"):
        load_config(_ServiceConfig, None, ["--broker.nope", "1"])
    with pytest.raises(ConfigError, match="stray"):
        load_config(_ServiceConfig, None, ["stray"])
