-- queue: KEYS[3] D a Redis list of encoded items; KEYS[4] K2 the set of this queue's
-- in-flight keys; KEYS[5] K3 this client thread's in-flight key: where a blocked get's
-- BLMOVE puts the item it takes, so that an item whose reply is lost stays there for the
-- retry (same request id) to answer with, instead of being dropped. Meta 'check' is maxsize,
-- 'unf' the unfinished tasks.

--- @op put
-- A: item, '1' if it may wait. Answer: ok, Full, or 'again' (full: the client waits).
local max = tonumber(redis.call('HGET', M, 'check')) or 0
if max > 0 and redis.call('LLEN', D) >= max then
  if A[2] == '1' then return {'again'} end
  return fail('Full')
end
redis.call('RPUSH', D, A[1])
redis.call('HINCRBY', M, 'unf', 1)
return {'ok'}

--- @op get
-- A: '1' if it may wait. Answer: {'ok', item}, Empty, or 'again' (empty: the client waits in
-- BLMOVE D -> K3, then calls this again with the same request id to take what it moved).
local v = redis.call('LPOP', K3)
if v then
  if redis.call('LLEN', K3) == 0 then redis.call('SREM', K2, K3) end
  return {'ok', v}
end
v = redis.call('LPOP', D)
if v then return {'ok', v} end
if A[1] == '1' then
  redis.call('SADD', K2, K3)
  return {'again'}
end
return fail('Empty')

--- @op qsize
return {'ok', redis.call('LLEN', D)}

--- @op info
-- Answer: {'ok', maxsize, unfinished, length}
return {'ok', redis.call('HGET', M, 'check') or '0', redis.call('HGET', M, 'unf') or '0',
  redis.call('LLEN', D)}

--- @op task_done
if (tonumber(redis.call('HGET', M, 'unf')) or 0) <= 0 then
  return fail('ValueError', 'task_done() called too many times')
end
redis.call('HINCRBY', M, 'unf', -1)
return {'ok'}
