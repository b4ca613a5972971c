-- Prepended to every operation script (kvclient/_redis/scripts/__init__.py builds them).
-- KEYS: 1 meta hash, 2 request ids, 3 data, 4 aux (dict: original keys), 5 aux (dict: order)
-- ARGV: 1 kind, 2 request-id token ('' for none), 3 its sequence number, 4.. the op's own
-- A reply is a table: {'ok', ...} or {'err', ExceptionName, detail} or {'again', ...} (not
-- an answer yet: the client waits or retries, and nothing is recorded under the request id).
local M, R, D, K2, K3 = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local KIND, TOK, SEQ = ARGV[1], ARGV[2], ARGV[3]
local have = redis.call('HGET', M, 'kind')
if not have then return {'err', 'NoSuchContainerError', ''} end
if have ~= KIND then return {'err', 'KindError', have} end
if TOK ~= '' then
  local prev = redis.call('HGET', R, TOK)
  if prev then
    local p = cmsgpack.unpack(prev)
    if p[1] == SEQ then
      -- A retry: answer as first answered. Writing the record again puts a write of this
      -- connection after the original one in the replication stream, so a WAIT after it
      -- (durability='replica') confirms the original too.
      redis.call('HSET', R, TOK, prev)
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
