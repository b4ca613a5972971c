-- The synchronization primitives (kvclient/_redis/kinds/sync.py): lock, rlock, semaphore,
-- bounded_semaphore and condition (leased holds), event and barrier. One file: the operations
-- share the helpers of the @common section. Every key below carries the container's hash
-- tag, so one primitive lives in one slot: each operation is one atomic script on one node.
--
-- Time is the server's (TIME, in milliseconds): leases never depend on a client's clock.
-- Numbers that may have a fraction leave a script as strings (a Lua number becomes a
-- truncated Redis integer).
--
-- Keys of a leased primitive (B = 'kv{name}:'):
--   M  (KEYS[1]) meta: kind, check (a semaphore's initial value, a barrier's 'parties|timeout'),
--                tok (last fencing token), free (a semaphore's free slots, once changed)
--   D  (KEYS[3]) holds: owner -> cmsgpack {c = count, l = lease, d = deadline, s = since,
--                t = {tokens}}
--   K2 (KEYS[4]) set of the auxiliary keys below, so that drop deletes them
--   K3 (KEYS[5]) zset of blocked calls by arrival: wait_id -> sequence
--   B..'w'   hash: a blocked call: wait_id -> cmsgpack {o = owner, l = lease, d = deadline,
--            a = true for an acquire, g = the token granted to it while it slept}
--   B..'l'   zset: owners whose hold was lost, 'e'..owner (lease expired) or 'r'..owner
--            (released by another owner), by time; the oldest beyond 1024 are forgotten
--   B..'c'   zset: a Condition's waiters by arrival; B..'cw' hash: wait_id -> cmsgpack
--            {o = owner, n = recursion level saved, l = lease, d = deadline, nt = notified}
--   B..'x:'..hex(wait_id)  list a blocked call sleeps on (BLPOP); one element wakes it
-- Event: M flag ('1' set) and gen (sets so far); K3 zset of waiters: wait_id -> expiry.
-- Barrier: M gen, count, broken; D hash generation -> '1' tripped / '0' broken (last 64);
-- K3 zset of waiters: wait_id -> expiry.

--- @common
local B = string.sub(M, 1, -2)
local W, L, C, CW = B .. 'w', B .. 'l', B .. 'c', B .. 'cw'
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local SEM = KIND == 'semaphore' or KIND == 'bounded_semaphore'
local REENTRANT = KIND == 'rlock' or KIND == 'condition'
-- Lock, RLock and Semaphore hand a freed hold to the first blocked acquire (FIFO, as on
-- kvserve); a Condition's blocked calls are all woken to compete for it.
local FIFO = KIND ~= 'condition'
local function hex(s)
  return (string.gsub(s, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local function wake(wid)
  local key = B .. 'x:' .. hex(wid)
  redis.call('DEL', key)
  redis.call('RPUSH', key, '1')
  redis.call('PEXPIRE', key, 60000)
end
local function wake_all()
  for _, wid in ipairs(redis.call('ZRANGE', K3, 0, -1)) do wake(wid) end
end
local function getp(key, field)
  local v = redis.call('HGET', key, field)
  if v then return cmsgpack.unpack(v) end
  return nil
end
local function putp(key, field, value)
  redis.call('HSET', key, field, cmsgpack.pack(value))
  if key ~= D then redis.call('SADD', K2, key) end
end
local function last_token() return tonumber(redis.call('HGET', M, 'tok') or '0') end
local function free_slots()
  local f = redis.call('HGET', M, 'free')
  if f then return tonumber(f) end
  return tonumber(redis.call('HGET', M, 'check'))
end
local function add_free(n) redis.call('HSET', M, 'free', free_slots() + n) end
local function mark_lost(owner, why)
  redis.call('ZREM', L, 'e' .. owner, 'r' .. owner)
  redis.call('ZADD', L, NOW, why .. owner)
  redis.call('SADD', K2, L)
  if redis.call('ZCARD', L) > 1024 then redis.call('ZPOPMIN', L) end
end
local function lost(owner)
  if redis.call('ZSCORE', L, 'r' .. owner) then return 'released' end
  if redis.call('ZSCORE', L, 'e' .. owner) then return 'expired' end
  return nil
end
local function holds()
  local out, flat = {}, redis.call('HGETALL', D)
  for i = 1, #flat, 2 do out[#out + 1] = {flat[i], cmsgpack.unpack(flat[i + 1])} end
  return out
end
local function grant(owner, lease, count)
  local tok = redis.call('HINCRBY', M, 'tok', 1)
  local h = getp(D, owner)
  if not h then
    h = {c = 0, l = lease, d = NOW + lease, s = NOW, t = {}}
  else
    h.l = lease
    if NOW + lease > h.d then h.d = NOW + lease end
  end
  h.t[#h.t + 1] = tok
  h.c = h.c + count
  putp(D, owner, h)
  redis.call('ZREM', L, 'e' .. owner, 'r' .. owner)
  return tok
end
local function unblock(wid)
  if wid == '' then return end
  redis.call('HDEL', W, wid)
  redis.call('ZREM', K3, wid)
  redis.call('DEL', B .. 'x:' .. hex(wid))
end
-- Hand freed holds to the first blocked acquires (a Condition: wake every blocked call).
local function handoff()
  if not FIFO then
    if redis.call('HLEN', D) == 0 then wake_all() end
    return
  end
  while true do
    if SEM then
      if free_slots() <= 0 then return end
    elseif redis.call('HLEN', D) > 0 then
      return
    end
    local wid = redis.call('ZRANGE', K3, 0, 0)[1]
    if not wid then return end
    redis.call('ZREM', K3, wid)
    local w = getp(W, wid)
    if w then
      if SEM then add_free(-1) end
      w.g = grant(w.o, w.l, 1)
      putp(W, wid, w)
      wake(wid)
    end
  end
end
-- Release every hold whose lease ran out, forget blocked calls and Condition waiters whose
-- client stopped renewing them, then hand on what was freed.
local function settle()
  local freed = false
  for _, pair in ipairs(holds()) do
    local owner, h = pair[1], pair[2]
    if h.d <= NOW then
      redis.call('HDEL', D, owner)
      if SEM then add_free(h.c) end
      mark_lost(owner, 'e')
      freed = true
    end
  end
  local flat = redis.call('HGETALL', W)
  for i = 1, #flat, 2 do
    if cmsgpack.unpack(flat[i + 1]).d <= NOW then unblock(flat[i]) end
  end
  if KIND == 'condition' then
    flat = redis.call('HGETALL', CW)
    for i = 1, #flat, 2 do
      local w = cmsgpack.unpack(flat[i + 1])
      if w.d <= NOW then
        redis.call('HDEL', CW, flat[i])
        redis.call('ZREM', C, flat[i])
        mark_lost(w.o, 'e')
      end
    end
  end
  if freed or FIFO then handoff() end
end
-- Milliseconds until the earliest lease runs out ('-1': nothing is held), as a string.
local function next_expiry()
  local best = nil
  for _, pair in ipairs(holds()) do
    local left = pair[2].d - NOW
    if best == nil or left < best then best = left end
  end
  if best == nil then return '-1' end
  if best < 0 then best = 0 end
  return tostring(best)
end
-- Register a blocked call (kept while its client renews), answer 'again' with the hint.
local function block(wid, owner, lease, is_acquire)
  local w = getp(W, wid)
  if not w then
    w = {o = owner, l = lease, d = NOW + lease, a = is_acquire}
    redis.call('ZADD', K3, redis.call('HINCRBY', M, 'seq', 1), wid)
  else
    w.d = math.max(w.d, NOW + lease)
  end
  putp(W, wid, w)
  return {'again', next_expiry()}
end
local function not_held(owner) return fail('NotHeld', lost(owner) or '') end
local function free_for(owner) return redis.call('HLEN', D) == 0 or redis.call('HEXISTS', D, owner) == 1 end
-- Event and Barrier waiters: K3 scored by when a waiter that stopped refreshing is forgotten.
local function park(wid, ttl)
  redis.call('ZREMRANGEBYSCORE', K3, '-inf', NOW)
  redis.call('ZADD', K3, NOW + tonumber(ttl), wid)
end
local function unpark(wid)
  redis.call('ZREM', K3, wid)
  redis.call('DEL', B .. 'x:' .. hex(wid))
end
-- An Event or Barrier wait not answered yet: {'ok', 0} if it ran out, else park, 'again'.
local function park_or_give_up(wid, phase, ttl, hint)
  if phase == 'last' then
    unpark(wid)
    return {'ok', 0}
  end
  park(wid, ttl)
  return {'again', hint}
end
-- End a Barrier's generation (tripped '1' or broken '0'), keeping the last 64 outcomes.
local function end_generation(gen, outcome)
  redis.call('HSET', D, gen, outcome)
  redis.call('HDEL', D, gen - 64)
  redis.call('HSET', M, 'gen', gen + 1, 'count', 0)
  wake_all()
  redis.call('DEL', K3)
end

--- @op acquire
-- A: owner, '1' to wait, wait_id or '', lease (ms), phase ('first', 'again' or 'last': the
-- wait ran out). Answer: {'ok', token} or {'ok', false}; {'again', ms to the next expiry}.
local owner, waits, wid, lease, phase = A[1], A[2] == '1', A[3], tonumber(A[4]), A[5]
settle()
if wid ~= '' then
  local w = getp(W, wid)
  if w and w.g then
    unblock(wid)
    return {'ok', w.g}
  end
end
if REENTRANT then
  local h = getp(D, owner)
  if h then
    h.c = h.c + 1
    putp(D, owner, h)
    unblock(wid)
    return {'ok', h.t[#h.t]}
  end
end
if (SEM and free_slots() > 0) or (not SEM and redis.call('HLEN', D) == 0) then
  if SEM then add_free(-1) end
  unblock(wid)
  return {'ok', grant(owner, lease, 1)}
end
if not waits or phase == 'last' or wid == '' then
  unblock(wid)
  return {'ok', false}
end
return block(wid, owner, lease, true)

--- @op release
-- A: owner, slots to give back (semaphores). Answer: {'ok', levels or slots still held}.
local owner = A[1]
settle()
if not SEM then
  local h = getp(D, owner)
  if not h then
    if KIND ~= 'lock' or lost(owner) or redis.call('HLEN', D) == 0 then
      return not_held(owner)
    end
    -- Another owner's hold: as threading lets any thread release a Lock.
    local holder = redis.call('HKEYS', D)[1]
    redis.call('HDEL', D, holder)
    mark_lost(holder, 'r')
    handoff()
    return {'ok', 0}
  end
  h.c = h.c - 1
  if h.c > 0 then
    putp(D, owner, h)
    return {'ok', h.c}
  end
  redis.call('HDEL', D, owner)
  handoff()
  return {'ok', 0}
end
local n = tonumber(A[2])
local h = getp(D, owner)
local held = h and h.c or 0
if held == 0 and lost(owner) then return not_held(owner) end
local bounded = KIND == 'bounded_semaphore'
if bounded and free_slots() + n > tonumber(redis.call('HGET', M, 'check')) then
  return fail('ValueError', 'Semaphore released too many times')
end
local function take_slots(who, hold, count)
  for _ = 1, count do table.remove(hold.t) end
  hold.c = hold.c - count
  if hold.c == 0 then redis.call('HDEL', D, who) else putp(D, who, hold) end
end
local returned = math.min(n, held)
if h then take_slots(owner, h, returned) end
if bounded and returned < n then
  -- A release by an owner holding fewer slots gives back the oldest other holders' slots.
  local others = holds()
  table.sort(others, function(x, y) return x[2].s < y[2].s end)
  for _, pair in ipairs(others) do
    if returned == n then break end
    local taken = math.min(n - returned, pair[2].c)
    take_slots(pair[1], pair[2], taken)
    returned = returned + taken
    if pair[2].c == 0 then mark_lost(pair[1], 'r') end
  end
end
add_free(n)
handoff()
return {'ok', held - math.min(n, held)}

--- @op release_token
-- A: a fencing token (a Lock's). Answer: {'ok', 1} when the hold it was issued to is ended
-- (whoever holds it), {'ok', 0} when no hold has it (released, or its lease ran out).
local token = tonumber(A[1])
settle()
for _, pair in ipairs(holds()) do
  for _, t in ipairs(pair[2].t) do
    if t == token then
      redis.call('HDEL', D, pair[1])
      mark_lost(pair[1], 'r')
      handoff()
      return {'ok', 1}
    end
  end
end
return {'ok', 0}

--- @op renew
-- A: owner, the largest token it got here. Answer: {'ok', holds, levels and waits renewed}.
local owner, token = A[1], tonumber(A[2])
settle()
if token > last_token() then redis.call('HSET', M, 'tok', token) end
local held = 0
local h = getp(D, owner)
if h then
  h.d = NOW + h.l
  putp(D, owner, h)
  held = h.c
end
for _, key in ipairs({W, CW}) do
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local w = cmsgpack.unpack(flat[i + 1])
    if w.o == owner then
      w.d = NOW + w.l
      putp(key, flat[i], w)
      if not w.g then held = held + 1 end
    end
  end
end
return {'ok', held}

--- @op locked
for _, pair in ipairs(holds()) do
  if pair[2].d > NOW then return {'ok', 1} end
end
return {'ok', 0}

--- @op get_value
local expired = 0
for _, pair in ipairs(holds()) do
  if pair[2].d <= NOW then expired = expired + pair[2].c end
end
return {'ok', free_slots() + expired}

--- @op status
-- Answer: {'ok', last token, waiters, now (ms), then owner, cmsgpack hold per live holder}.
local waiting = 0
local flat = redis.call('HGETALL', W)
for i = 1, #flat, 2 do
  local w = cmsgpack.unpack(flat[i + 1])
  if w.a and not w.g and w.d > NOW then waiting = waiting + 1 end
end
flat = redis.call('HGETALL', CW)
for i = 1, #flat, 2 do
  if cmsgpack.unpack(flat[i + 1]).d > NOW then waiting = waiting + 1 end
end
local out = {'ok', last_token(), waiting, tostring(NOW)}
for _, pair in ipairs(holds()) do
  if pair[2].d > NOW then
    out[#out + 1] = pair[1]
    out[#out + 1] = cmsgpack.pack(pair[2])
  end
end
return out

--- @op wait_begin
-- A: owner, wait_id, lease (ms). Answer: {'ok', the recursion level saved}.
local owner, wid, lease = A[1], A[2], tonumber(A[3])
settle()
local h = getp(D, owner)
if not h then return fail('RuntimeError', 'cannot wait on un-acquired lock') end
if redis.call('HEXISTS', CW, wid) == 1 then
  return fail('ValueError', 'this wait_id is already waiting')
end
redis.call('HDEL', D, owner)
putp(CW, wid, {o = owner, n = h.c, l = lease, d = NOW + lease, nt = false})
redis.call('ZADD', C, redis.call('HINCRBY', M, 'seq', 1), wid)
redis.call('SADD', K2, C)
handoff()
return {'ok', h.c}

--- @op wait_end
-- A: owner, wait_id, level, lease (ms), phase. Answer: {'ok', token} once notified and the
-- lock is free; {'ok', false} when the wait ran out (or its lease did); else 'again'.
local owner, wid, count, lease, phase = A[1], A[2], tonumber(A[3]), tonumber(A[4]), A[5]
settle()
local w = getp(CW, wid)
if not w then
  unblock(wid)
  return {'ok', false}
end
if w.nt and free_for(owner) then
  redis.call('HDEL', CW, wid)
  redis.call('ZREM', C, wid)
  unblock(wid)
  return {'ok', grant(owner, lease, math.max(1, count))}
end
if phase == 'last' then
  unblock(wid)
  return {'ok', false}
end
if w.nt then return block(wid, owner, lease, false) end
return {'again', '-1'}

--- @op reacquire
-- A: owner, wait_id, level, lease (ms). Answer: {'ok', token, 1 if a notify came}, or 'again'
-- while the lock is held by another.
local owner, wid, count, lease = A[1], A[2], tonumber(A[3]), tonumber(A[4])
settle()
if not free_for(owner) then return block(wid, owner, lease, false) end
local w = getp(CW, wid)
redis.call('HDEL', CW, wid)
redis.call('ZREM', C, wid)
unblock(wid)
local notified = 0
if w and w.nt then notified = 1 end
return {'ok', grant(owner, lease, math.max(1, count)), notified}

--- @op notify
-- A: owner, how many ('' for all). Answer: {'ok', how many were woken}.
local owner, n = A[1], tonumber(A[2])
settle()
if redis.call('HEXISTS', D, owner) == 0 then
  return fail('RuntimeError', 'cannot notify on un-acquired lock')
end
local woken = 0
for _, wid in ipairs(redis.call('ZRANGE', C, 0, -1)) do
  if n ~= nil and woken >= n then break end
  local w = getp(CW, wid)
  if w and not w.nt then
    w.nt = true
    putp(CW, wid, w)
    wake(wid)
    woken = woken + 1
  end
end
return {'ok', woken}

--- @op set
redis.call('HSET', M, 'flag', '1')
redis.call('HINCRBY', M, 'gen', 1)
wake_all()
redis.call('DEL', K3)
return {'ok'}

--- @op clear
redis.call('HSET', M, 'flag', '0')
return {'ok'}

--- @op is_set
return {'ok', redis.call('HGET', M, 'flag') == '1' and 1 or 0}

--- @op wait
-- A: wait_id, the sets counted when it began ('' at first), phase, ms to stay registered.
-- Answer: {'ok', 1} once set (or set since it began), {'ok', 0} when it ran out, else
-- {'again', sets counted}.
local wid, seen, phase = A[1], A[2], A[3]
local gen = redis.call('HGET', M, 'gen') or '0'
if redis.call('HGET', M, 'flag') == '1' or (seen ~= '' and seen ~= gen) then
  unpark(wid)
  return {'ok', 1}
end
return park_or_give_up(wid, phase, A[4], gen)

--- @op info
-- Answer: {'ok', check ('parties|timeout'), generation, count, broken}.
return {'ok', redis.call('HGET', M, 'check'), tonumber(redis.call('HGET', M, 'gen') or '0'),
  tonumber(redis.call('HGET', M, 'count') or '0'), redis.call('HGET', M, 'broken') == '1' and 1 or 0}

--- @op arrive
-- Answer: {'ok', generation, index, 1 if this party tripped it, check}.
local function broken() return redis.call('HGET', M, 'broken') == '1' end
if broken() then return fail('BrokenBarrierError') end
local check = redis.call('HGET', M, 'check')
local parties = tonumber(string.match(check, '^(%d+)'))
local gen = tonumber(redis.call('HGET', M, 'gen') or '0')
local index = tonumber(redis.call('HGET', M, 'count') or '0')
if index + 1 == parties then
  end_generation(gen, '1')
  return {'ok', gen, index, 1, check}
end
redis.call('HSET', M, 'count', index + 1)
return {'ok', gen, index, 0, check}

--- @op await_trip
-- A: generation, wait_id, phase, ms to stay registered. Answer: {'ok', 1} tripped,
-- {'ok', 0} ran out, BrokenBarrierError, or 'again'.
local g, wid, phase = tonumber(A[1]), A[2], A[3]
local gen = tonumber(redis.call('HGET', M, 'gen') or '0')
if g > gen or g < 0 then
  return fail('ValueError', 'barrier generation ' .. A[1] .. ' has not started')
end
if g < gen then
  unpark(wid)
  if redis.call('HGET', D, g) == '1' then return {'ok', 1} end
  return fail('BrokenBarrierError')
end
if redis.call('HGET', M, 'broken') == '1' then
  unpark(wid)
  return fail('BrokenBarrierError')
end
return park_or_give_up(wid, phase, A[4], '-1')

--- @op timed_out
-- A: generation. Break the barrier unless it tripped meanwhile. Answer: {'ok', 1 if tripped}.
local g = tonumber(A[1])
local gen = tonumber(redis.call('HGET', M, 'gen') or '0')
if g < gen then return {'ok', redis.call('HGET', D, g) == '1' and 1 or 0} end
if g == gen then
  redis.call('HSET', M, 'broken', '1')
  wake_all()
end
return {'ok', 0}

--- @op abort
redis.call('HSET', M, 'broken', '1')
wake_all()
return {'ok'}

--- @op reset
local gen = tonumber(redis.call('HGET', M, 'gen') or '0')
if redis.call('HGET', M, 'broken') == '1' or tonumber(redis.call('HGET', M, 'count') or '0') > 0 then
  end_generation(gen, '0')
end
redis.call('HSET', M, 'broken', '0')
wake_all()
return {'ok'}
