-- Create a container if it does not exist (no prologue: it may not exist yet).
-- KEYS: as every script. ARGV: 1 kind, 2 check (the creation arguments, encoded), 3 layout
-- ('list', 'string', 'hash' or 'none'), 4.. initial items: list: encoded items; string: the
-- encoded value; hash: triples
-- (canonical key, original key or '', value).
-- Reply: {'created'}, {'exists', check} or {'err', 'KindError', kind}.
local M, D, K2, K3 = KEYS[1], KEYS[3], KEYS[4], KEYS[5]
local have = redis.call('HGET', M, 'kind')
if have then
  if have ~= ARGV[1] then return {'err', 'KindError', have} end
  return {'exists', redis.call('HGET', M, 'check') or ''}
end
redis.call('HSET', M, 'kind', ARGV[1], 'check', ARGV[2], 'ver', 0, 'seq', 0)
if ARGV[3] == 'list' then
  local i = 4
  while i <= #ARGV do
    local j = math.min(i + 999, #ARGV)
    redis.call('RPUSH', D, unpack(ARGV, i, j))
    i = j + 1
  end
elseif ARGV[3] == 'string' then
  redis.call('SET', D, ARGV[4])
elseif ARGV[3] == 'hash' then
  local seq = 0
  for i = 4, #ARGV, 3 do
    if redis.call('HSET', D, ARGV[i], ARGV[i + 2]) == 1 then
      seq = seq + 1
      redis.call('ZADD', K3, seq, ARGV[i])
      if ARGV[i + 1] ~= '' then redis.call('HSET', K2, ARGV[i], ARGV[i + 1]) end
    else
      redis.call('HSET', D, ARGV[i], ARGV[i + 2])
    end
  end
  redis.call('HSET', M, 'seq', seq)
end
return {'created'}
