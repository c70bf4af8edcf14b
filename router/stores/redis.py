"""Redis counter store: shared by every router replica; one Lua script per operation.

Each operation (reserve, settle/release, read) is one ``EVALSHA`` of a script that Redis runs
atomically, so no replica can interleave a check and an increment. Keys (prefix ``kars:budget:``)::

    c:<counter>    hash {used, reserved}; expires a grace period after its window ends
    r:<id>         hash {state: held|swept|done, amount, counters}: one reservation
    deadlines      sorted set of held reservation ids by deadline (epoch seconds)

Crash safety: ``reserve`` first releases up to ``SWEEP_BATCH`` held reservations whose deadline
has passed (marking them ``swept``), so a dead replica's reservations are released by whichever
replica reserves next. The scripts are idempotent, so the client may retry one after a timeout:
a reserve whose reservation exists answers "admitted" again without charging twice, and a
settle or release of a reservation already ``done`` does nothing.

A reserve whose reply is lost (a timeout after the script ran) answers 503 to its caller and
holds its tokens until its deadline: the error costs budget, never overspends it.

The sweep reaches reservation keys not passed in ``KEYS``: fine on a standalone Redis (or a
primary with replicas), not on Redis Cluster, which would need every key in one hash slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from router.stores import base

PREFIX = "kars:budget:"
CONNECT_TIMEOUT_S = 1.0  # a Redis that is down fails requests fast (503), it does not hang them
COMMAND_TIMEOUT_S = 5.0  # generous: an event loop busy with a burst reads replies late
POOL_WAIT_S = 10.0  # a burst queues for a pooled connection rather than failing closed
MAX_CONNECTIONS = 64
RETRIES = 2  # safe: every script is idempotent
DONE_TTL_S = 600  # a settled reservation is remembered this long, so a retried settle is a no-op

_UNRESERVE = """
local function unreserve(counters, amount)
  for _, c in ipairs(counters) do
    if redis.call('EXISTS', c) == 1 and redis.call('HINCRBY', c, 'reserved', -amount) < 0 then
      redis.call('HSET', c, 'reserved', 0)
    end
  end
end
"""

# KEYS: deadlines, r:<id>, c:<counter>...   ARGV: now, deadline, amount, id, r-prefix, record-expiry,
# sweep batch, then (limit, expires-at, enforce) per counter. Returns {admitted, used1, reserved1, used2, ...}.
_RESERVE = (
    _UNRESERVE
    + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[7]))
for _, rid in ipairs(expired) do
  local rkey = ARGV[5] .. rid
  local rec = redis.call('HMGET', rkey, 'state', 'amount', 'counters')
  if rec[1] == 'held' then
    local held = {}
    for c in string.gmatch(rec[3], '[^\\n]+') do held[#held + 1] = c end
    unreserve(held, tonumber(rec[2]))
    redis.call('HSET', rkey, 'state', 'swept')
  end
  redis.call('ZREM', KEYS[1], rid)
end
local amount = tonumber(ARGV[3])
local out = {1}
local ok = true
local counters = {}
for i = 3, #KEYS do
  local n = i - 2
  counters[n] = KEYS[i]
  local v = redis.call('HMGET', KEYS[i], 'used', 'reserved')
  local used, reserved = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  out[2 * n], out[2 * n + 1] = used, reserved
  local j = 7 + 3 * (n - 1)
  if ARGV[j + 3] == '1' and used + reserved + amount > tonumber(ARGV[j + 1]) then ok = false end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return out end
if not ok then
  out[1] = 0
  return out
end
for n, c in ipairs(counters) do
  redis.call('HINCRBY', c, 'reserved', amount)
  redis.call('EXPIREAT', c, ARGV[7 + 3 * (n - 1) + 2])
end
redis.call('HSET', KEYS[2], 'state', 'held', 'amount', amount, 'counters', table.concat(counters, '\\n'))
redis.call('EXPIREAT', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
return out
"""
)

# KEYS: deadlines, r:<id>, c:<counter>...   ARGV: actual tokens (-1: release), id, done-ttl.
_FINISH = (
    _UNRESERVE
    + """
local rec = redis.call('HMGET', KEYS[2], 'state', 'amount')
if rec[1] == 'done' then return 0 end
local counters = {}
for i = 3, #KEYS do counters[#counters + 1] = KEYS[i] end
if rec[1] == 'held' then unreserve(counters, tonumber(rec[2])) end
local actual = tonumber(ARGV[1])
if actual > 0 then
  for _, c in ipairs(counters) do
    if redis.call('EXISTS', c) == 1 then redis.call('HINCRBY', c, 'used', actual) end
  end
end
redis.call('HSET', KEYS[2], 'state', 'done')
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[2])
return 1
"""
)

_READ = """
local out = {}
for i, c in ipairs(KEYS) do
  local v = redis.call('HMGET', c, 'used', 'reserved')
  out[2 * i - 1], out[2 * i] = tonumber(v[1]) or 0, tonumber(v[2]) or 0
end
return out
"""


def _pairs(flat: Sequence[Any]) -> list[base.Counter]:
    return [base.Counter(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


class RedisStore:
    name = "redis"

    def __init__(self, url: str, *, prefix: str = PREFIX) -> None:
        self._url = url
        self._prefix = prefix
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    async def open(self) -> None:
        # No network here: connections are made on first use, so a Redis that is down at start
        # makes the router not ready (and budgeted requests 503), never unable to start.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), RETRIES),
        )
        self._client = aioredis.Redis.from_pool(pool)
        for name, source in (("reserve", _RESERVE), ("finish", _FINISH), ("read", _READ)):
            self._scripts[name] = self._client.register_script(source)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        if self._client is None:
            raise base.StoreUnavailable("the Redis budget store is not open")
        try:
            return await self._scripts[script](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise base.StoreUnavailable(f"Redis budget store: {type(exc).__name__}: {exc}") from exc

    def _keys(self, reservation_id: str, counters: Sequence[str]) -> list[str]:
        p = self._prefix
        return [p + "deadlines", p + "r:" + reservation_id, *(p + "c:" + c for c in counters)]

    async def reserve(
        self, reservation_id: str, charges: Sequence[base.Charge], amount: int, *, deadline: float, now: float
    ) -> base.Outcome:
        args: list[Any] = [
            repr(now),
            repr(deadline),
            amount,
            reservation_id,
            self._prefix + "r:",
            # A held reservation's record must outlive its deadline until a sweep finds it, however
            # idle the store is: it lives as long as the longest-lived counter it charges.
            math.ceil(max([deadline, *(ch.expires_at for ch in charges)])),
            base.SWEEP_BATCH,
        ]
        for ch in charges:
            args += [ch.limit, math.ceil(ch.expires_at), 1 if ch.enforce else 0]
        flat = await self._eval("reserve", self._keys(reservation_id, [ch.counter for ch in charges]), args)
        return base.Outcome(bool(int(flat[0])), tuple(_pairs(flat[1:])))

    async def settle(self, reservation_id: str, counters: Sequence[str], actual: int) -> None:
        await self._eval("finish", self._keys(reservation_id, counters), [max(0, actual), reservation_id, DONE_TTL_S])

    async def release(self, reservation_id: str, counters: Sequence[str]) -> None:
        await self._eval("finish", self._keys(reservation_id, counters), [-1, reservation_id, DONE_TTL_S])

    async def read(self, counters: Sequence[str]) -> list[base.Counter]:
        if not counters:
            return []
        flat = await self._eval("read", [self._prefix + "c:" + c for c in counters], [])
        return _pairs(flat)

    async def claim_once(self, key: str, until: float) -> bool:
        """Claim ``key`` until ``until`` (epoch seconds): True the first time, False while it is held.

        One ``SET NX EXAT``, atomic across every replica: what the signed-request layer uses to see a
        ``jti`` only once in the whole deployment (SPEC.md §5).
        """
        if self._client is None:
            raise base.StoreUnavailable("the Redis store is not open")
        try:
            claimed = await self._client.set(self._prefix + key, b"1", nx=True, exat=math.ceil(until))
        except (RedisError, OSError) as exc:
            raise base.StoreUnavailable(f"Redis: {type(exc).__name__}: {exc}") from exc
        return bool(claimed)

    async def ping(self) -> str | None:
        if self._client is None:
            return "the Redis budget store is not open"
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            return f"Redis budget store: {type(exc).__name__}: {exc}"
        return None
