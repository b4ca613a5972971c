-- queue: KEYS[3] D a Redis list of encoded items; KEYS[4] K2 its bell: a list of at most one
-- token that a blocked get waits on (BLPOP), never an item. Meta 'check' is maxsize, 'unf'
-- the unfinished tasks.
--
-- An item leaves D only inside a get script, which records the answer under the get's
-- request id in the same atomic step: the item is always in exactly one place, D or that
-- answer, never with a consumer that has not been answered (a retry after a lost reply gets
-- the recorded answer). Waiting is on the bell, not on D, so a consumer that stalls or dies
-- while it waits, or after it is woken, holds no item: the worst it can do is take the bell,
-- which delays another waiter until that one's wait times out (one wait: at most 5 s) or the
-- next put or woken get rings again.

--- @common
-- Leave one token in the bell (waking the first waiter in line) unless one is there.
local function ring()
  if redis.call('LLEN', K2) == 0 then redis.call('RPUSH', K2, '1') end
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
ring()
return {'ok'}

--- @op get
-- A: '1' if it may wait, then '1' if it has waited (this call's BLPOP on the bell returned:
-- woken, or its wait ended). Answer: {'ok', item}, Empty, or 'again' (empty: the client waits
-- in BLPOP on K2, then calls this again with the same request id).
-- A get that has waited may have taken the bell a put rang for several items, or have been
-- woken for an item another consumer took: once it takes one, it rings again for what is
-- left. A get about to wait clears the bell: with D empty, no token there is for anyone.
local v = redis.call('LPOP', D)
if v then
  if A[2] == '1' and redis.call('LLEN', D) > 0 then ring() end
  return {'ok', v}
end
if A[1] == '1' then
  redis.call('DEL', K2)
  return {'again'}
end
return fail('Empty')

--- @op unget
-- The fence of a cancelled get (kvclient._redis.aio), run without a request id once its
-- BLPOP can take nothing more. A: the get's token and sequence number. Puts back, at the tail
-- of D, what that get took: its recorded answer (the record becomes Empty, so a retry of this
-- puts back nothing); never takes from D. No maxsize check and no change to 'unf': the item
-- was never done. Rings when D holds items (the cancelled BLPOP may have taken the bell).
-- Answer: {'ok', n put back}.
local tok, seq = A[1], A[2]
local rec, where = recorded(tok)
local n = 0
if rec then
  local p = cmsgpack.unpack(rec)
  if p[1] == seq and p[2][1] == 'ok' then
    redis.call('RPUSH', D, p[2][2])
    redis.call('HSET', where, tok, cmsgpack.pack({seq, {'err', 'Empty', ''}}))
    n = 1
  end
end
if redis.call('LLEN', D) > 0 then ring() end
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
