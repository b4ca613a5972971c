-- Delete a container and everything it keeps (a queue's in-flight items: the set at KEYS[4]
-- names their keys). Answer: 1 if it existed, else 0.
local existed = redis.call('EXISTS', KEYS[1])
if redis.call('TYPE', KEYS[4]).ok == 'set' then
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('DEL', key) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return existed
