"""Capacity reservations in Redis: the atomic pick-and-reserve at dispatch, and its release.

Layout (keys from ``kunserve.protocol.RedisKeys``)::

    kunserve:load:<id>      hash of InstanceLoad fields, written by the worker, PEXPIRE ttl
                            (the key exists <=> the instance is live)
    kunserve:reserved:<id>  hash {tokens, requests}: dispatched by a router, not yet in the
                            worker's load; PEXPIRE reservation_ttl_ms, refreshed by each
                            reservation, so a lost release cannot leak forever

``RESERVE_LUA`` reads every candidate's load and reservation, scores them exactly like
``load_balancer.pick`` and HINCRBYs the winner's reservation, in one atomic step: two routers
dispatching at once see each other's reservations and never herd onto one instance.
``RELEASE_LUA`` takes a reservation back (the worker does, when its load shows the request),
never below zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from kunserve.protocol import RedisKeys

# KEYS: load_1, reserved_1, load_2, reserved_2, ...   ARGV: tokens, ttl_ms, id_1, id_2, ...
# Returns the chosen instance id, or nil when no candidate is live.
RESERVE_LUA = """
local tokens = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local best, best_demand, best_capacity, best_count
for i = 1, #KEYS, 2 do
  local load = redis.call('HMGET', KEYS[i], 'blocks_total', 'blocks_used', 'block_size',
                          'queued_tokens', 'running', 'waiting')
  local total = tonumber(load[1]) or 0
  local block_size = tonumber(load[3]) or 0
  if total > 0 and block_size > 0 then
    local reserved = redis.call('HMGET', KEYS[i + 1], 'tokens', 'requests')
    local queued_blocks = math.ceil((tonumber(load[4]) or 0) / block_size)
    local demand = ((tonumber(load[2]) or 0) + queued_blocks) * block_size
                   + math.max(tonumber(reserved[1]) or 0, 0)
    local capacity = total * block_size
    local count = (tonumber(load[5]) or 0) + (tonumber(load[6]) or 0)
                  + math.max(tonumber(reserved[2]) or 0, 0)
    local better = best == nil
    if not better then
      local left, right = demand * best_capacity, best_demand * capacity
      better = left < right or (left == right and count < best_count)
    end
    if better then
      best, best_demand, best_capacity, best_count = i, demand, capacity, count
    end
  end
end
if best == nil then
  return nil
end
redis.call('HINCRBY', KEYS[best + 1], 'tokens', tokens)
redis.call('HINCRBY', KEYS[best + 1], 'requests', 1)
redis.call('PEXPIRE', KEYS[best + 1], ttl_ms)
return ARGV[2 + (best + 1) / 2]
"""

# KEYS: reserved   ARGV: tokens, requests.   Returns the remaining {tokens, requests}.
# An expired hash stays absent (no TTL-less zero hash is created).
RELEASE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
local left = {}
for i, field in ipairs({'tokens', 'requests'}) do
  local value = redis.call('HINCRBY', KEYS[1], field, -tonumber(ARGV[i]))
  if value < 0 then
    redis.call('HSET', KEYS[1], field, 0)
    value = 0
  end
  left[i] = value
end
return left
"""


def reservation_tokens(num_prompt_tokens: int, max_tokens: int) -> int:
    """The KV tokens a request is reserved for: its prompt plus everything it may generate."""
    return num_prompt_tokens + max_tokens


class Reservations:
    """The two scripts bound to one ``redis.asyncio.Redis`` client (EVALSHA, loaded lazily)."""

    def __init__(self, redis, ttl_ms: int = 5000) -> None:
        self.redis = redis
        self.ttl_ms = ttl_ms
        self._reserve = redis.register_script(RESERVE_LUA)
        self._release = redis.register_script(RELEASE_LUA)

    async def reserve(self, candidates: Sequence[str], tokens: int) -> str | None:
        """Pick the best live candidate and reserve ``tokens`` and one request on it; None
        when no candidate is live. Ties go to the earlier candidate."""
        if not candidates:
            return None
        keys = [key for i in candidates for key in (RedisKeys.load(i), RedisKeys.reserved(i))]
        chosen = await self._reserve(keys=keys, args=[tokens, self.ttl_ms, *candidates])
        if isinstance(chosen, bytes):
            chosen = chosen.decode()
        return chosen

    async def release(self, instance_id: str, tokens: int, requests: int = 1,
                      client=None) -> None:
        """Take back a reservation (clamped at zero). ``client``: a pipeline to queue the
        release in, so it lands atomically with a load write."""
        await self._release(keys=[RedisKeys.reserved(instance_id)], args=[tokens, requests],
                            client=client)
