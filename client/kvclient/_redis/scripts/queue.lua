-- queue: KEYS[3] D a Redis list of encoded items; KEYS[4] K2 a sorted set of this queue's
-- in-flight lists, each by the time (server ms) its lease ends; KEYS[5] K3 this client
-- thread's in-flight list: where a blocked get's BLMOVE puts the item it takes, so that an
-- item whose reply is lost stays there for the retry (same request id) to answer with,
-- instead of being dropped. Meta 'check' is maxsize, 'unf' the unfinished tasks.

--- @common
-- Put back at the head of D, in the order their leases ended, the items of in-flight lists
-- whose lease has ended (their consumer died, or was cut off longer than its lease, between
-- its BLMOVE and its get): at most 8 lists per script, so that a queue script stays short.
-- A consumer that comes back later finds its list empty and takes from D like any other.
local function reclaim()
  local first = redis.call('ZRANGE', K2, 0, 0, 'WITHSCORES')
  if #first == 0 or tonumber(first[2]) > now_ms() then return end
  local ended = redis.call('ZRANGEBYSCORE', K2, '-inf', now_ms(), 'LIMIT', 0, 8)
  for i = #ended, 1, -1 do
    while redis.call('LMOVE', ended[i], D, 'RIGHT', 'LEFT') do end
  end
  redis.call('ZREM', K2, unpack(ended))
end

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
-- A: '1' if it may wait, then the ms to keep K3 in flight (the BLMOVE's wait plus the lease).
-- Answer: {'ok', item}, Empty, or 'again' (empty: the client waits in BLMOVE D -> K3, then
-- calls this again with the same request id to take what it moved). Taking the item from K3
-- ends its lease in the same step as recording the answer: an item answered is never put back.
-- Every get that does not answer from K3 reclaims ended leases first (one ZRANGE when none
-- has ended, and TIME only if some list is in flight), so a reclaimed item is the next one
-- taken, whether or not the queue ever runs empty.
local v = redis.call('LPOP', K3)
if v then
  if redis.call('LLEN', K3) == 0 then redis.call('ZREM', K2, K3) end
  return {'ok', v}
end
reclaim()
v = redis.call('LPOP', D)
if v then return {'ok', v} end
if A[1] == '1' then
  redis.call('ZADD', K2, now_ms() + tonumber(A[2]), K3)
  return {'again'}
end
return fail('Empty')

--- @op unget
-- The fence of a cancelled get (kvclient._redis.aio), run without a request id once nothing
-- can reach K3 any more. A: the get's token and sequence number. Puts back, at the tail of
-- D, only what that get took: its recorded answer (the record becomes Empty, so a retry of
-- this puts back nothing), else what is in its in-flight list K3; never takes from D. No
-- maxsize check and no change to 'unf': the item was never done. Answer: {'ok', n put back}.
local tok, seq = A[1], A[2]
local rec, where = recorded(tok)
if rec then
  local p = cmsgpack.unpack(rec)
  if p[1] == seq and p[2][1] == 'ok' then
    redis.call('RPUSH', D, p[2][2])
    redis.call('HSET', where, tok, cmsgpack.pack({seq, {'err', 'Empty', ''}}))
    return {'ok', 1}
  end
end
local n = 0
while redis.call('LMOVE', K3, D, 'LEFT', 'RIGHT') do n = n + 1 end
redis.call('ZREM', K2, K3)
return {'ok', n}

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
