"""The wire schema: every message that crosses a process boundary through Redis, as msgspec Structs.

Token ids and logprobs travel as packed little-endian numpy buffers (int32 / float32) inside msgpack,
never as lists: a 128K-token prompt is 512 KB of bytes, not a million msgpack integers. The prompt
travels once per group. Use `pack_ids`/`pack_logprobs` to build a field and the `*_np` accessors to
read one (zero-copy views). Decoding a payload of another schema version or of the wrong shape
raises `SchemaError`, which consumers turn into a dead letter.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

SCHEMA_VERSION = 2
"""The wire format's version, in every message. 2: `Sample` keeps its reasoning/content split as offsets into its
text (`TextSplit`) instead of two more copies of it; an entry of version 1 is dead-lettered as undecodable."""

IDS_DTYPE = np.dtype("<i4")
LOGPROBS_DTYPE = np.dtype("<f4")

FinishReason = Literal["stop", "length", "abort"]
# completed: ended on a stop token; truncated: hit max_new_tokens; aborted: the engine aborted it for good.
Status = Literal["completed", "truncated", "aborted"]


class SchemaError(ValueError):
    """A payload could not be decoded into the expected message (malformed, wrong type or schema version)."""


def pack_ids(ids: npt.ArrayLike) -> bytes:
    return np.ascontiguousarray(ids, dtype=IDS_DTYPE).tobytes()


def pack_logprobs(logprobs: npt.ArrayLike) -> bytes:
    return np.ascontiguousarray(logprobs, dtype=LOGPROBS_DTYPE).tobytes()


def unpack_ids(buf: bytes) -> npt.NDArray[np.int32]:
    return np.frombuffer(buf, dtype=IDS_DTYPE)


def unpack_logprobs(buf: bytes) -> npt.NDArray[np.float32]:
    return np.frombuffer(buf, dtype=LOGPROBS_DTYPE)


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Sampling parameters as SGLang's native /generate takes them (the subset the RL loop uses)."""

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: list[int] = []
    stop: list[str] = []
    skip_special_tokens: bool = False
    no_stop_trim: bool = True


class RewardInfo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the reward needs besides the response: LongTraceRL's `metadata.extra_reward_info`."""

    question: str
    rubrics: list[str] = []
    dataset_name: str = "longqa"
    extra: dict[str, Any] = {}


class Task(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag="task"):
    """One group to generate: a prompt and how many samples of it (written by the feeder to `tasks`)."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    group_id: str  # idempotency key through the whole pipeline
    dataset_index: int
    epoch: int = 0
    prompt_ids: bytes  # int32, pack_ids
    label: str
    reward_info: RewardInfo
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    num_samples: int = 8
    policy_version: int  # the learner's policy version at admission (the staleness reference)
    created_s: float = 0.0

    def prompt_ids_np(self) -> npt.NDArray[np.int32]:
        return unpack_ids(self.prompt_ids)


class WeightSegment(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """Response tokens [start, next segment's start) were generated under policy version `policy_version` (what
    the engine reported for them, weights/version.py). Array-like: the field names are not on the wire."""

    start: int
    policy_version: int


class TextSplit(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Where the message processor split a sample's text (rollout_server/worker/processors.py), as code-point
    offsets into `Sample.text`: the reasoning is text[:reasoning_end], the final answer text[content_start:
    content_end]. Three integers on the wire instead of a second copy of the text."""

    reasoning_end: int
    content_start: int
    content_end: int

    @classmethod
    def of(cls, text: str, reasoning: str, content: str) -> TextSplit | None:
        """The split of `text` into `reasoning` (a prefix of it) and `content` (its last occurrence after the
        reasoning); None when both are empty (nothing to split). ValueError when `text` holds no such split."""
        if not reasoning and not content:
            return None
        if not text.startswith(reasoning):
            raise ValueError(f"the reasoning ({len(reasoning)} characters) does not begin the text")
        start = text.rfind(content, len(reasoning))
        if start < 0:
            raise ValueError(f"the content ({len(content)} characters) is not in the text after the reasoning")
        return cls(len(reasoning), start, start + len(content))


class Sample(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One response of a group, as generated and parsed by the rollout worker.

    The text travels once: its reasoning and final answer are read through `split` (the `reasoning` and `content`
    properties). A split that does not fit the text is refused at construction and at decode (a dead letter)."""

    response_ids: bytes  # int32
    logprobs: bytes  # float32, one per response token, engine-side log p (see rollout_server docs)
    text: str
    finish_reason: FinishReason
    status: Status
    split: TextSplit | None = None  # None: not split (truncated, aborted, no stop token): no reasoning nor content
    ill_formed: bool = False
    task_unfinished: bool = False
    weight_segments: list[WeightSegment] = []
    engine_id: str = ""
    num_resumes: int = 0  # times it was resubmitted after a pause-with-abort
    gen_s: float = 0.0
    # Routing replay (MoE): the Redis key of the engine's routed experts of this sample, stored beside the entry by
    # the rollout worker (broker/routing.py: tens of MB at long context, never in the entry); None
    # without replay, and in entries written before the field.
    routing_key: str | None = None

    def __post_init__(self) -> None:
        sp = self.split
        if sp is not None and not 0 <= sp.reasoning_end <= sp.content_start <= sp.content_end <= len(self.text):
            raise ValueError(
                f"split ({sp.reasoning_end}, {sp.content_start}, {sp.content_end}) does not fit a text of "
                f"{len(self.text)} characters"
            )

    @property
    def reasoning(self) -> str:
        """The text before the last </think> (one trailing newline dropped); "" when not split."""
        return self.text[: self.split.reasoning_end] if self.split is not None else ""

    @property
    def content(self) -> str:
        """The final answer after </think>, without the stop token; "" when not split."""
        return self.text[self.split.content_start : self.split.content_end] if self.split is not None else ""

    def response_ids_np(self) -> npt.NDArray[np.int32]:
        return unpack_ids(self.response_ids)

    def logprobs_np(self) -> npt.NDArray[np.float32]:
        return unpack_logprobs(self.logprobs)

    @property
    def oldest_policy_version(self) -> int | None:
        """The oldest policy version any of its tokens was generated under; None when it has no segments."""
        return min((s.policy_version for s in self.weight_segments), default=None)


class Group(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag="group"):
    """A generated group: the task (prompt once) and its samples (written by rollout workers to `rollouts`)."""

    schema_version: int = SCHEMA_VERSION
    task: Task
    samples: list[Sample]
    worker_id: str = ""
    rollout_s: float = 0.0

    @property
    def group_id(self) -> str:
        return self.task.group_id

    @property
    def group_version(self) -> int:
        """The policy version the group counts as generated under, for staleness: the oldest among its samples'
        weight segments; the task's admission version when none recorded any (the group is at least that old).
        Every reader of a group's version (the learner's batching, the async bench, eval) uses this."""
        versions = [v for s in self.samples if (v := s.oldest_policy_version) is not None]
        return min(versions, default=self.task.policy_version)


class SampleReward(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The reward of one sample and its parts (METHOD.md §2)."""

    reward: float  # final, after group normalisation and the combination rule
    outcome_reward: float  # r_oc in {0, 1}
    rubric_reward: float  # r_rb after group max-normalisation
    raw_rubric_reward: float = 0.0  # r̂_rb before normalisation
    zeroed_reason: str = ""  # why it was set to 0 without judging (truncated, ill_formed, ...), if so
    judge_s: float = 0.0


class ScoredGroup(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag="scored"):
    """A group with one reward per sample (written by reward workers to `scored`)."""

    schema_version: int = SCHEMA_VERSION
    group: Group
    rewards: list[SampleReward]
    scorer_id: str = ""
    score_s: float = 0.0

    @property
    def group_id(self) -> str:
        return self.group.group_id


class DeadLetter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag="dead"):
    """An entry a consumer gave up on, with why; the original bytes are kept for inspection or replay."""

    schema_version: int = SCHEMA_VERSION
    stream: str
    entry_id: str
    reason: str
    delivery_count: int
    payload: bytes
    consumer: str = ""
    created_s: float = 0.0
    # The group the dead entry carried, when its payload still names one (broker/entries.py reads it even from an
    # entry that no longer decodes as its stream's message); "" when it does not. The learner releases that
    # group's admission slot (learner/upstream.py); an older letter without the field reads as "".
    group_id: str = ""


Message = Task | Group | ScoredGroup | DeadLetter
M = TypeVar("M", Task, Group, ScoredGroup, DeadLetter)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def encode_into(msg: Message, buffer: bytearray) -> None:
    """Encode `msg` into `buffer`, replacing its contents; its allocation is kept for the next message."""
    _encoder.encode_into(msg, buffer)


def decode(data: bytes, kind: type[M]) -> M:
    """Decode one message of type `kind`; raise SchemaError on any malformed or foreign payload."""
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        msg = dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        # msgspec lets a string that is not UTF-8 through as UnicodeDecodeError: a poison entry all the same.
        raise SchemaError(f"cannot decode {kind.__name__}: {e}") from e
    if msg.schema_version != SCHEMA_VERSION:
        raise SchemaError(f"{kind.__name__} has schema_version {msg.schema_version}, expected {SCHEMA_VERSION}")
    assert isinstance(msg, kind)
    return msg
