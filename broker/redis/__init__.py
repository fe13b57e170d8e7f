"""The Redis backend of the broker: Redis Streams with one consumer group per stream (redis-py, sync).

A stream is a queue: consumers XACK and XDEL an entry in one MULTI, so XLEN is the backlog (unread plus pending)
and XLEN minus the group's pending count (XINFO GROUPS) is what is not yet delivered. Needs Redis >= 6.2
(XPENDING IDLE, exclusive XRANGE starts); XINFO GROUPS `lag` (7.0) is not used. Async services call it through
asyncio.to_thread.

One module per part: `layout` (key names, the entry's one field), `scripts` (the Lua scripts), `connection`
(the client and the retrying call wrapper, `broker.retry`), `producer` (idempotent, backpressured publish),
`consumer` (read order, claims, touch, dead letters, ack), `state` (policy version, engine registry, run
state), `view` (the read-only view for harnesses) and `backend` (`RedisBroker`, assembling them).
"""

from broker.redis.backend import RedisBroker
from broker.redis.connection import redact_url
from broker.redis.layout import FIELD

__all__ = ["FIELD", "RedisBroker", "redact_url"]
