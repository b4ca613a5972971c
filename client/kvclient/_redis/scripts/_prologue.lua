-- Prepended to every operation script (kvclient/_redis/scripts/__init__.py builds them).
-- KEYS: 1 meta hash, 2 request ids (R; R..'0' the previous generation), 3 data, 4 aux (dict:
-- original keys), 5 aux (dict: order)
-- ARGV: 1 kind, 2 request-id token ('' for none), 3 its sequence number, 4.. the op's own
-- A reply is a table: {'ok', ...} or {'err', ExceptionName, detail} or {'again', ...} (not
-- an answer yet: the client waits or retries, and nothing is recorded under the request id).
local M, R, D, K2, K3 = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local KIND, TOK, SEQ = ARGV[1], ARGV[2], ARGV[3]
-- Any client with the password can send a hand-made request id: it is checked as kvserve
-- checks one (kvproto.wire.RID_TOKEN_MAX), so no answer is kept under a token or sequence
-- number longer than a client's own (the table's bytes stay bounded, not only its count).
if TOK ~= '' and (#TOK > 64 or #SEQ > 20 or not string.find(SEQ, '^%d+$')) then
  return {'err', 'ProtocolError', 'malformed request id'}
end
local have = redis.call('HGET', M, 'kind')
if not have then return {'err', 'NoSuchContainerError', ''} end
if have ~= KIND then return {'err', 'KindError', have} end
-- The serving node's clock, in milliseconds (read once per script): leases and windows never
-- depend on a client's clock.
local clock_ms
local function now_ms()
  if not clock_ms then
    local t = redis.call('TIME')
    clock_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock_ms
end
-- Request ids are kept in two generations: R, and the previous one, R..'0'. An answer goes
-- to R; the first answer of a token in this generation (FRESH) may first start a new one (R
-- becomes R..'0', the one before is dropped) when R..'0' has been retired for longer than
-- the longest retry window of its tokens (each token ends in ':<ms>', its client's window:
-- kvclient/_redis/_retention.py; meta 'rw0', and 'rw' for R), or when R holds 65536 ids (as
-- kvserve keeps 65536 sessions). So an answer is kept at least its client's window after
-- it was written, unless 65536 other client threads wrote here since, and the table holds
-- at most 131072. A token's next calls in the same generation pay nothing for it.
-- A window is at most a day (86400000 ms, kvclient/_redis/_retention.py's MAX_WINDOW_MS, as
-- long as any client's): a hand-made token's huge window ('1e+30', 'inf' once stored) would
-- otherwise stop its container's generations from ever ending by time.
local R0, FRESH = R .. '0', false
local function window_ms(v, default)
  v = tonumber(v)
  if not v or v ~= v then return default end  -- not a number, or nan
  return math.max(0, math.min(v, 86400000))
end
local function keep_request_id(record)
  if FRESH then
    local window = window_ms(string.match(TOK, ':(%d+)$'), 600000)
    local gen = redis.call('HMGET', M, 'rgen', 'rw', 'rw0')
    local now, born = now_ms(), tonumber(gen[1])
    local rw, rw0 = window_ms(gen[2], 0), window_ms(gen[3], 0)
    if not born or now - born > rw0 or redis.call('HLEN', R) >= 65536 then
      if born then
        redis.call('UNLINK', R0)
        if redis.call('EXISTS', R) == 1 then redis.call('RENAME', R, R0) end
      end
      redis.call('HSET', M, 'rgen', now, 'rw0', rw, 'rw', window)
    elseif window > rw then
      redis.call('HSET', M, 'rw', window)
    end
  end
  redis.call('HSET', R, TOK, record)
end
-- The answer recorded under token tok (nil if none), and the generation that holds it.
local function recorded(tok)
  local found = redis.call('HGET', R, tok)
  if found then return found, R end
  return redis.call('HGET', R0, tok), R0
end
if TOK ~= '' then
  local prev, where = recorded(TOK)
  FRESH = where == R0
  if prev then
    local p = cmsgpack.unpack(prev)
    if p[1] == SEQ then
      -- A retry: answer as first answered. Writing the record again puts a write of this
      -- connection after the original one in the replication stream, so a WAIT after it
      -- (durability='replica') confirms the original too.
      keep_request_id(prev)
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
