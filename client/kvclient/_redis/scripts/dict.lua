-- dict (and namespace): KEYS[3] D hash canonical key -> value, KEYS[4] K2 hash canonical key ->
-- original key (only where they differ: 1.0 stored first stays 1.0), KEYS[5] K3 zset of
-- canonical keys by insertion sequence (Python's order: keys(), popitem()).
-- Keys arrive canonical (1, 1.0 and True are one key) and encoded; values encoded.

--- @op get
local v = redis.call('HGET', D, A[1])
if v then return {'ok', v} end
return {'ok'}

--- @op contains
return {'ok', redis.call('HEXISTS', D, A[1])}

--- @op len
return {'ok', redis.call('HLEN', D)}

--- @op set
-- A: canonical key, original key or '', value
if redis.call('HSET', D, A[1], A[3]) == 1 then
  redis.call('ZADD', K3, redis.call('HINCRBY', M, 'seq', 1), A[1])
  if A[2] ~= '' then redis.call('HSET', K2, A[1], A[2]) end
end
return {'ok'}

--- @op update
-- A: triples (canonical key, original key or '', value)
for i = 1, #A, 3 do
  if redis.call('HSET', D, A[i], A[i + 2]) == 1 then
    redis.call('ZADD', K3, redis.call('HINCRBY', M, 'seq', 1), A[i])
    if A[i + 1] ~= '' then redis.call('HSET', K2, A[i], A[i + 1]) end
  end
end
return {'ok'}

--- @op delete
-- A: canonical key, 'raise' to answer KeyError when missing
if redis.call('HDEL', D, A[1]) == 0 then
  if A[2] == 'raise' then return fail('KeyError') end
  return {'ok', 0}
end
redis.call('ZREM', K3, A[1])
redis.call('HDEL', K2, A[1])
return {'ok', 1}

--- @op delete_many
local n = 0
for i = 1, #A do
  if redis.call('HDEL', D, A[i]) == 1 then
    redis.call('ZREM', K3, A[i])
    redis.call('HDEL', K2, A[i])
    n = n + 1
  end
end
return {'ok', n}

--- @op pop
-- A: canonical key, '1' if a default was given. Answer: {'ok', value} or {'ok'} (missing).
local v = redis.call('HGET', D, A[1])
if not v then
  if A[2] == '1' then return {'ok'} end
  return fail('KeyError')
end
redis.call('HDEL', D, A[1])
redis.call('ZREM', K3, A[1])
redis.call('HDEL', K2, A[1])
return {'ok', v}

--- @op popitem
local last = redis.call('ZRANGE', K3, -1, -1)[1]
if not last then return fail('KeyError', 'popitem(): dictionary is empty') end
local v = redis.call('HGET', D, last)
local key = redis.call('HGET', K2, last) or last
redis.call('HDEL', D, last)
redis.call('ZREM', K3, last)
redis.call('HDEL', K2, last)
return {'ok', key, v}

--- @op setdefault
-- A: canonical key, original key or '', default. Answer: {'ok', the value now stored}.
local v = redis.call('HGET', D, A[1])
if v then return {'ok', v} end
redis.call('HSET', D, A[1], A[3])
redis.call('ZADD', K3, redis.call('HINCRBY', M, 'seq', 1), A[1])
if A[2] ~= '' then redis.call('HSET', K2, A[1], A[2]) end
return {'ok', A[3]}

--- @op cas
-- A: canonical key, expected (encoded), new (encoded). Equal encodings are equal values of
-- the same type, which is kvserve's strict cas.
local v = redis.call('HGET', D, A[1])
if v and v == A[2] then
  redis.call('HSET', D, A[1], A[3])
  return {'ok', 1}
end
return {'ok', 0}

--- @op incr
-- A: canonical key, original key or '', increment (encoded number), default (encoded).
-- Answer: {'ok', new value encoded} or TypeError 'value' (the stored value is no number).
local cur = redis.call('HGET', D, A[1])
local stored = cur or A[4]
local function number(bytes)
  local b = string.byte(bytes, 1)
  if b == 0xcb then return struct.unpack('>d', bytes, 2), true end
  if b == 0xca then return struct.unpack('>f', bytes, 2), true end
  if b <= 0x7f or b >= 0xe0 or (b >= 0xcc and b <= 0xd3) then
    return cmsgpack.unpack(bytes), false
  end
  return nil, false
end
local x, xf = number(stored)
if x == nil then
  local b = string.byte(stored, 1)
  -- an ext (a bigint, or a tuple): Python decides (see get_raw, swap)
  if b == 0xc7 or b == 0xc8 or b == 0xc9 or (b >= 0xd4 and b <= 0xd8) then return {'again'} end
  return fail('TypeError', 'value')
end
local y, yf = number(A[3])
local exact = 9007199254740992
if y == nil or (not xf and math.abs(x) >= exact) or (not yf and math.abs(y) >= exact) then
  return {'again'}  -- a bigint, or beyond 2**53: the client adds (see get_raw, swap)
end
local sum = x + y
local out
if xf or yf then
  out = struct.pack('>Bd', 0xcb, sum)
else
  if math.abs(sum) >= exact then return {'again'} end
  out = cmsgpack.pack(sum)
end
if redis.call('HSET', D, A[1], out) == 1 then
  redis.call('ZADD', K3, redis.call('HINCRBY', M, 'seq', 1), A[1])
  if A[2] ~= '' then redis.call('HSET', K2, A[1], A[2]) end
end
return {'ok', out}

--- @op get_raw
-- Answer: {'ok', value or ''}
return {'ok', redis.call('HGET', D, A[1]) or ''}

--- @op swap
-- A: canonical key, original key or '', expected encoding ('' for missing), new encoding.
-- Answer: {'ok', new} if the value was still the expected one, else 'again'.
if (redis.call('HGET', D, A[1]) or '') ~= A[3] then return {'again'} end
if redis.call('HSET', D, A[1], A[4]) == 1 then
  redis.call('ZADD', K3, redis.call('HINCRBY', M, 'seq', 1), A[1])
  if A[2] ~= '' then redis.call('HSET', K2, A[1], A[2]) end
end
return {'ok', A[4]}

--- @op get_many
-- A: canonical keys. Answer: {'ok', value or '' per key} (an encoded value is never empty).
local out = {'ok'}
for i = 1, #A do out[#out + 1] = redis.call('HGET', D, A[i]) or '' end
return out

--- @op items
-- Answer: {'ok', key1, value1, key2, value2, ...} in insertion order.
local out = {'ok'}
for _, ck in ipairs(redis.call('ZRANGE', K3, 0, -1)) do
  out[#out + 1] = redis.call('HGET', K2, ck) or ck
  out[#out + 1] = redis.call('HGET', D, ck)
end
return out

--- @op keys
local out = {'ok'}
for _, ck in ipairs(redis.call('ZRANGE', K3, 0, -1)) do
  out[#out + 1] = redis.call('HGET', K2, ck) or ck
end
return out

--- @op values
local out = {'ok'}
for _, ck in ipairs(redis.call('ZRANGE', K3, 0, -1)) do
  out[#out + 1] = redis.call('HGET', D, ck)
end
return out

--- @op clear
redis.call('DEL', D, K2, K3)
return {'ok'}
