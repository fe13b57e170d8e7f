"""The Lua scripts of the Redis backend: the steps that must be atomic and cannot be a MULTI (they branch on
what they read). Run through `Connection.eval_many`, by SHA."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

VERSION_EVENTS_MAXLEN = 16  # the policy version's notification stream only needs its last id


@dataclass(frozen=True)
class Script:
    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


# KEYS: stream, dead stream; ARGV: group, entry id, encoded DeadLetter. -> 1 buried | 0 was not pending.
# Only an entry still pending is written to `dead`, so a retried call cannot bury it twice.
BURY = Script(
    "bury",
    """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then redis.call('XADD', KEYS[2], '*', 'd', ARGV[3]) end
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
""",
)

# KEYS: version key, events stream; ARGV: expected ('' = unconditional), new version. -> 1 set | 0 mismatch
SET_VERSION = Script(
    "set_version",
    f"""
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[1] ~= '' and cur ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '{VERSION_EVENTS_MAXLEN}', '*', 'v', ARGV[2])
return 1
""",
)

# Expiry times use the Redis server's clock, so engines and readers on other hosts need no clock sync.
# KEYS: info hash, expiry zset; ARGV: engine id, EngineInfo JSON, ttl s
REGISTER = Script(
    "register",
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.6f', now + tonumber(ARGV[3])), ARGV[1])
return 1
""",
)

# KEYS: info hash, expiry zset. Drops expired engines, returns the JSON of the live ones.
LIVE = Script(
    "live",
    """
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[1], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[1], unpack(ids))
""",
)

# KEYS: stop guard, skip guard, stream[, dedup key[, previous message's dedup key]]; ARGV: max_backlog.
# -> 1 go | 0 duplicate | -1 stop. The check of one message of the producer's one-round-trip publish
# (broker.redis.producer): it runs between WATCH (both guards, the dedup key) and that message's MULTI/EXEC, and
# aborts the EXEC by writing a watched guard. A duplicate (its dedup key exists) writes and deletes the skip
# guard: only this message is skipped. Every other refusal sets the stop guard, which stops this message and every
# later one of the pipeline, so what is added stays in order: a stop already set, no room under max_backlog
# undelivered entries (XLEN minus the groups' pending counts, as the two-round-trip path computes it), the
# previous message neither added nor already there (its EXEC aborted by a concurrent write), or an error (pcall).
# Sent with EVAL, not EVALSHA: a NOSCRIPT error would leave the EXEC unguarded. No payload passes through Lua,
# and a "go" writes nothing.
PUBLISH_CHECK = Script(
    "publish_check",
    """
local ok, verdict = pcall(function()
  if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
  if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
  if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 0 then return -1 end
  local undelivered = redis.call('XLEN', KEYS[3])
  if undelivered > 0 then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[3])) do
      for j = 1, #g - 1, 2 do
        if g[j] == 'pending' then undelivered = undelivered - tonumber(g[j + 1]) end
      end
    end
  end
  if undelivered >= tonumber(ARGV[1]) then return -1 end
  return 1
end)
if ok and verdict == 1 then return 1 end
if ok and verdict == 0 then
  redis.call('SET', KEYS[2], '1')
  redis.call('DEL', KEYS[2])
  return 0
end
redis.call('SET', KEYS[1], '1', 'PX', 60000)
return -1
""",
)
