-- array: KEYS[3] D a Redis list of encoded items, of a length fixed at creation; meta 'check'
-- is 'typecode:length'. Items arrive already converted to the typecode by the client.

--- @op len
return {'ok', redis.call('LLEN', D)}

--- @op getitem
local n, i = redis.call('LLEN', D), tonumber(A[1])
if i < -n or i >= n then return fail('IndexError', 'invalid index') end
return {'ok', redis.call('LINDEX', D, i)}

--- @op setitem
local n, i = redis.call('LLEN', D), tonumber(A[1])
if i < -n or i >= n then return fail('IndexError', 'invalid index') end
redis.call('LSET', D, i, A[2])
return {'ok'}

--- @op getslice
local items = redis.call('LRANGE', D, 0, -1)
local out = {'ok'}
for _, p in ipairs(positions(#items, A[1], A[2], A[3])) do out[#out + 1] = items[p + 1] end
return out

--- @op setslice
local n = redis.call('LLEN', D)
local pos = positions(n, A[1], A[2], A[3])
if #pos ~= #A - 3 then return fail('ValueError', 'Can only assign sequence of same size') end
for j, p in ipairs(pos) do redis.call('LSET', D, p, A[3 + j]) end
return {'ok'}

--- @op tolist
local out = {'ok'}
for _, v in ipairs(redis.call('LRANGE', D, 0, -1)) do out[#out + 1] = v end
return out

--- @op typecode
return {'ok', string.match(redis.call('HGET', M, 'check'), '^[^:]*')}
