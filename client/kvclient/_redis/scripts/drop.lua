-- Delete a container and everything it keeps: a queue's in-flight lists (the sorted set at
-- KEYS[4] names them), a primitive's auxiliary keys (the set at KEYS[4] names them), the
-- previous generation of its request ids (KEYS[2]..'0'). Answer: 1 if it existed, else 0.
local existed = redis.call('EXISTS', KEYS[1])
local aux = redis.call('TYPE', KEYS[4]).ok
if aux == 'set' then
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('DEL', key) end
elseif aux == 'zset' and redis.call('HGET', KEYS[1], 'kind') == 'queue' then
  for _, key in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do redis.call('DEL', key) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[2] .. '0', KEYS[3], KEYS[4], KEYS[5])
return existed
