"""What both backends decide the same way about a stream entry: its message, or the reason a consumer gives up on
it (the dead letter's `reason`), and the dead letter itself.

One place, so that the in-memory backend used by unit tests dead-letters exactly what Redis would, and a peek
(`StreamView.peek`) reports exactly the entries a consumer would bury.
"""

from __future__ import annotations

import time

import msgspec

from broker.schemas import DeadLetter, M, SchemaError, decode

UNDECODABLE = "undecodable"  # how the reason of an entry no consumer can decode begins
OVER_DELIVERED = "delivered"  # how the reason of an entry given up on after `max_deliveries` begins


def decode_entry(payload: bytes, kind: type[M]) -> M | str:
    """The message, or why a consumer cannot use it (`undecodable: ...`)."""
    try:
        return decode(payload, kind)
    except SchemaError as e:
        return f"{UNDECODABLE}: {e}"


def triage(payload: bytes, delivery_count: int, kind: type[M], max_deliveries: int) -> M | str:
    """As `decode_entry`, but an entry delivered more than `max_deliveries` times is given up on first (a poison
    pill that kills every consumer must not come back forever)."""
    if delivery_count > max_deliveries:
        return f"{OVER_DELIVERED} {delivery_count} times (max_deliveries {max_deliveries})"
    return decode_entry(payload, kind)


# Just the path to the group id of each message, every other field ignored: an entry of another schema version or
# with one malformed field still names its group.
class _TaskRef(msgspec.Struct, tag="task"):
    group_id: str


class _GroupRef(msgspec.Struct, tag="group"):
    task: _TaskRef


class _ScoredRef(msgspec.Struct, tag="scored"):
    group: _GroupRef


class _DeadRef(msgspec.Struct, tag="dead"):
    group_id: str = ""


_Ref = _TaskRef | _GroupRef | _ScoredRef | _DeadRef
_group_ref: msgspec.msgpack.Decoder[_Ref] = msgspec.msgpack.Decoder(_Ref)


def group_id_of(payload: bytes) -> str:
    """The group id an encoded message carries, decodable or not as its stream's message; "" when none can be read."""
    try:
        ref = _group_ref.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return ""
    if isinstance(ref, _GroupRef):
        return ref.task.group_id
    if isinstance(ref, _ScoredRef):
        return ref.group.task.group_id
    return ref.group_id


def dead_letter(
    stream: str, entry_id: str, payload: bytes, delivery_count: int, reason: str, by: str, group_id: str | None = None
) -> DeadLetter:
    """The letter written to the dead stream; it keeps the original bytes for inspection or replay, and the group
    id (read from the payload unless given) so that the learner can release the group's admission slot."""
    return DeadLetter(
        stream=stream,
        entry_id=entry_id,
        reason=reason,
        delivery_count=delivery_count,
        payload=payload,
        consumer=by,
        created_s=time.time(),
        group_id=group_id_of(payload) if group_id is None else group_id,
    )
