"""Where the Redis backend keeps a run: the key names and the layout of a stream entry.

Every key is `longtrace:{<run_id>}:<name>`; the braces are a cluster hash tag, so one run lives in one slot and
every transaction or Lua script may touch all of its keys. Each stream entry has one field, `d`, the
msgspec-encoded message; an entry without it (a foreign producer's) is undecodable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FIELD = b"d"  # the one field of every entry: the encoded message


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def no_payload_reason(fields: dict[bytes, bytes]) -> str:
    """Why an entry without the payload field cannot be used (the dead letter's reason)."""
    names = sorted(text(k) for k in fields)
    return f"undecodable: no payload field {FIELD.decode()!r} (the entry has fields {names})"


@dataclass(frozen=True)
class Keys:
    """Every key name of one run."""

    run_id: str

    def key(self, name: str) -> str:
        return f"longtrace:{{{self.run_id}}}:{name}"

    def dedup(self, stream: str, dedup_key: str) -> str:
        """Set (with `dedup_ttl_s`) when a message with this dedup key is added to `stream`."""
        return self.key(f"dedup:{stream}:{dedup_key}")

    def pattern(self, prefix: str = "") -> str:
        """SCAN MATCH pattern of the run's keys whose name starts with `prefix` (glob characters escaped, so a
        run id like `a*` matches no other run's keys)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.key(prefix)) + "*"

    def dedup_pattern(self, stream: str) -> str:
        """SCAN MATCH pattern of the dedup keys of `stream`."""
        return self.pattern(f"dedup:{stream}:")

    @property
    def policy_version(self) -> str:
        return self.key("policy_version")

    @property
    def policy_events(self) -> str:
        """A short stream that every policy version change appends to (for blocking waits)."""
        return self.key("policy_version:events")

    @property
    def engines(self) -> str:
        """Hash: engine id -> EngineInfo JSON."""
        return self.key("engines")

    @property
    def engines_expiry(self) -> str:
        """Sorted set: engine id scored by its expiry time (the Redis server's clock)."""
        return self.key("engines:expiry")

    @property
    def marker(self) -> str:
        """String: the run's RunMarker as JSON, written once when the run starts, no TTL (broker/base.py)."""
        return self.key("marker")

    @property
    def state(self) -> str:
        """Hash of the run's small string key/values."""
        return self.key("state")
