-- list: KEYS[3] D a Redis list of encoded items. Every change bumps the meta 'ver', which the
-- read-compute-commit operations (remove, sort: Python's equality and ordering are not
-- Lua's) check. Indexes arrive as text, already checked to be ints by the client.

--- @op getitem
local v = redis.call('LINDEX', D, A[1])
if not v then return fail('IndexError', 'list index out of range') end
return {'ok', v}

--- @op setitem
local n, i = redis.call('LLEN', D), tonumber(A[1])
if i < 0 then i = i + n end
if i < 0 or i >= n then return fail('IndexError', 'list assignment index out of range') end
redis.call('LSET', D, i, A[2])
bump()
return {'ok'}

--- @op delitem
local n, i = redis.call('LLEN', D), tonumber(A[1])
if i < 0 then i = i + n end
if i < 0 or i >= n then return fail('IndexError', 'list assignment index out of range') end
delete_at(D, i)
bump()
return {'ok'}

--- @op len
return {'ok', redis.call('LLEN', D)}

--- @op copy
-- Answer: {'ok', version, item, item, ...}
local out = {'ok', redis.call('HGET', M, 'ver') or '0'}
for _, v in ipairs(redis.call('LRANGE', D, 0, -1)) do out[#out + 1] = v end
return out

--- @op getslice
local n = redis.call('LLEN', D)
local pos, step, first, last = positions(n, A[1], A[2], A[3])
local out = {'ok'}
if #pos == 0 then return out end
if step == 1 then
  for _, v in ipairs(redis.call('LRANGE', D, first, last - 1)) do out[#out + 1] = v end
  return out
end
local items = redis.call('LRANGE', D, 0, -1)
for _, p in ipairs(pos) do out[#out + 1] = items[p + 1] end
return out

--- @op setslice
-- A: start, stop, step, values...
local items = redis.call('LRANGE', D, 0, -1)
local n = #items
local pos, step, first, last = positions(n, A[1], A[2], A[3])
local count = #A - 3
local new = {}
if step == 1 then
  if last < first then last = first end
  for i = 1, first do new[#new + 1] = items[i] end
  for i = 4, #A do new[#new + 1] = A[i] end
  for i = last + 1, n do new[#new + 1] = items[i] end
else
  if count ~= #pos then
    return fail('ValueError', 'attempt to assign sequence of size ' .. count ..
      ' to extended slice of size ' .. #pos)
  end
  for i = 1, n do new[i] = items[i] end
  for j, p in ipairs(pos) do new[p + 1] = A[3 + j] end
end
redis.call('DEL', D)
push_all(D, new, 1, #new)
bump()
return {'ok'}

--- @op delslice
local items = redis.call('LRANGE', D, 0, -1)
local pos = positions(#items, A[1], A[2], A[3])
if #pos > 0 then
  for _, p in ipairs(pos) do items[p + 1] = false end
  local new = {}
  for i = 1, #items do if items[i] then new[#new + 1] = items[i] end end
  redis.call('DEL', D)
  push_all(D, new, 1, #new)
  bump()
end
return {'ok'}

--- @op append
redis.call('RPUSH', D, A[1])
bump()
return {'ok'}

--- @op extend
push_all(D, A, 1, #A)
bump()
return {'ok'}

--- @op imul
-- A: n, most items, most bytes
local times = tonumber(A[1])
if times <= 0 then
  redis.call('DEL', D)
elseif times > 1 then
  local items = redis.call('LRANGE', D, 0, -1)
  if #items * times > tonumber(A[2]) then
    return fail('ValueError', 'l *= ' .. times .. ' would hold more than ' .. A[2] .. ' items')
  end
  local size = 0
  for _, v in ipairs(items) do size = size + #v end
  if size * times > tonumber(A[3]) then
    return fail('ValueError', 'l *= ' .. times .. ' would hold more than ' .. A[3] ..
      ' bytes of values')
  end
  for _ = 2, times do push_all(D, items, 1, #items) end
end
bump()
return {'ok'}

--- @op insert
local n, i = redis.call('LLEN', D), tonumber(A[1])
if i < 0 then i = math.max(i + n, 0) end
if i >= n then
  redis.call('RPUSH', D, A[2])
elseif i == 0 then
  redis.call('LPUSH', D, A[2])
else
  local tail = redis.call('LRANGE', D, i, -1)
  redis.call('LTRIM', D, 0, i - 1)
  redis.call('RPUSH', D, A[2])
  push_all(D, tail, 1, #tail)
end
bump()
return {'ok'}

--- @op pop
local n, i = redis.call('LLEN', D), tonumber(A[1])
if n == 0 then return fail('IndexError', 'pop from empty list') end
if i < 0 then i = i + n end
if i < 0 or i >= n then return fail('IndexError', 'pop index out of range') end
local v
if i == n - 1 then
  v = redis.call('RPOP', D)
elseif i == 0 then
  v = redis.call('LPOP', D)
else
  v = redis.call('LINDEX', D, i)
  delete_at(D, i)
end
bump()
return {'ok', v}

--- @op remove_at
-- A: version the client computed against, index. 'again' if the list changed since.
if (redis.call('HGET', M, 'ver') or '0') ~= A[1] then return {'again'} end
delete_at(D, tonumber(A[2]))
bump()
return {'ok'}

--- @op replace
-- A: version the client computed against, the new items (sort). 'again' if it changed.
if (redis.call('HGET', M, 'ver') or '0') ~= A[1] then return {'again'} end
redis.call('DEL', D)
push_all(D, A, 2, #A)
bump()
return {'ok'}

--- @op reverse
local items = redis.call('LRANGE', D, 0, -1)
local new = {}
for i = #items, 1, -1 do new[#new + 1] = items[i] end
redis.call('DEL', D)
push_all(D, new, 1, #new)
bump()
return {'ok'}

--- @op clear
redis.call('DEL', D)
bump()
return {'ok'}
