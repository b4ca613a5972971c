-- Prepended to every operation script (kvclient/_redis/scripts/__init__.py builds them).
-- KEYS: 1 meta hash, 2 request ids (R; R..'t' when each is forgotten), 3 data, 4 aux (dict:
-- original keys), 5 aux (dict: order)
-- ARGV: 1 kind, 2 request-id token ('' for none), 3 its sequence number, 4.. the op's own
-- A reply is a table: {'ok', ...} or {'err', ExceptionName, detail} or {'again', ...} (not
-- an answer yet: the client waits or retries, and nothing is recorded under the request id).
local M, R, D, K2, K3 = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local KIND, TOK, SEQ = ARGV[1], ARGV[2], ARGV[3]
local have = redis.call('HGET', M, 'kind')
if not have then return {'err', 'NoSuchContainerError', ''} end
if have ~= KIND then return {'err', 'KindError', have} end
-- The serving node's clock, in milliseconds: leases never depend on a client's clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Keep TOK's answer in R until its window ends (the token ends in ':<ms>', its client's retry
-- window: kvclient/_redis/_retention.py), in the sorted set R..'t' by that end. A token new
-- here forgets up to two whose window has ended and, beyond 65536, the nearest its end; so
-- the table holds about the client threads that wrote within their windows, and no retry
-- of a kept token is missed.
local function keep_request_id()
  local T, now = R .. 't', now_ms()
  local ends = now + (tonumber(string.match(TOK, ':(%d+)$')) or 600000)
  if redis.call('ZADD', T, ends, TOK) == 0 then return end
  local gone = redis.call('ZRANGEBYSCORE', T, '-inf', now, 'LIMIT', 0, 2)
  if #gone > 0 then
    redis.call('ZREM', T, unpack(gone))
    redis.call('HDEL', R, unpack(gone))
  end
  if redis.call('ZCARD', T) > 65536 then
    redis.call('HDEL', R, redis.call('ZPOPMIN', T)[1])
  end
end
if TOK ~= '' then
  local prev = redis.call('HGET', R, TOK)
  if prev then
    local p = cmsgpack.unpack(prev)
    if p[1] == SEQ then
      -- A retry: answer as first answered. Writing the record again puts a write of this
      -- connection after the original one in the replication stream, so a WAIT after it
      -- (durability='replica') confirms the original too.
      redis.call('HSET', R, TOK, prev)
      keep_request_id()
      return p[2]
    end
  end
end
local A = {}
for i = 4, #ARGV do A[#A + 1] = ARGV[i] end
local function fail(name, detail) return {'err', name, detail or ''} end
local function bump() redis.call('HINCRBY', M, 'ver', 1) end
-- Lua 5.1's unpack has a C stack limit: push long lists in chunks.
local function push_all(key, items, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call('RPUSH', key, unpack(items, i, j))
    i = j + 1
  end
end
-- Python's slice.indices(n): the positions (0-based) a slice of a sequence of n items names.
-- start, stop, step arrive as text, '' for None (the client checked they are ints, step ~= 0).
local function positions(n, start, stop, step)
  step = tonumber(step) or 1
  local lower, upper = 0, n
  if step < 0 then lower, upper = -1, n - 1 end
  local function clamp(v, default)
    v = tonumber(v)
    if v == nil then return default end
    if v < 0 then return math.max(v + n, lower) end
    return math.min(v, upper)
  end
  local first = clamp(start, step < 0 and upper or lower)
  local last = clamp(stop, step < 0 and lower or upper)
  local out = {}
  local i = first
  while (step > 0 and i < last) or (step < 0 and i > last) do
    out[#out + 1] = i
    i = i + step
  end
  return out, step, first, last
end
-- A value no encoding produces (0xc1 is never used by msgpack): marks an item to delete.
local GONE = '\193'
local function delete_at(key, index)
  redis.call('LSET', key, index, GONE)
  redis.call('LREM', key, 1, GONE)
end
