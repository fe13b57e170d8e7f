"""What both backends decide the same way about a stream entry: its message, or the reason a consumer gives up on
it (the dead letter's `reason`), and the dead letter itself.

One place, so that the in-memory backend used by unit tests dead-letters exactly what Redis would, and a peek
(`StreamView.peek`) reports exactly the entries a consumer would bury.
"""

from __future__ import annotations

import time

from broker.schemas import DeadLetter, M, SchemaError, decode


def decode_entry(payload: bytes, kind: type[M]) -> M | str:
    """The message, or why a consumer cannot use it (`undecodable: ...`)."""
    try:
        return decode(payload, kind)
    except SchemaError as e:
        return f"undecodable: {e}"


def triage(payload: bytes, delivery_count: int, kind: type[M], max_deliveries: int) -> M | str:
    """As `decode_entry`, but an entry delivered more than `max_deliveries` times is given up on first (a poison
    pill that kills every consumer must not come back forever)."""
    if delivery_count > max_deliveries:
        return f"delivered {delivery_count} times (max_deliveries {max_deliveries})"
    return decode_entry(payload, kind)


def dead_letter(stream: str, entry_id: str, payload: bytes, delivery_count: int, reason: str, by: str) -> DeadLetter:
    """The letter written to the dead stream; it keeps the original bytes for inspection or replay."""
    return DeadLetter(
        stream=stream,
        entry_id=entry_id,
        reason=reason,
        delivery_count=delivery_count,
        payload=payload,
        consumer=by,
        created_s=time.time(),
    )
