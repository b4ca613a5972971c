-- value: KEYS[3] D a string holding the encoded value; meta 'check' is the typecode.
-- incr is read-compute-commit: the typecode's rules (kvproto.typecodes) are Python's.

--- @op get
return {'ok', redis.call('GET', D)}

--- @op snapshot
return {'ok', redis.call('HGET', M, 'ver') or '0', redis.call('GET', D)}

--- @op set
redis.call('SET', D, A[1])
bump()
return {'ok'}

--- @op commit
-- A: version the client computed against, the new value. 'again' if it changed since.
if (redis.call('HGET', M, 'ver') or '0') ~= A[1] then return {'again'} end
redis.call('SET', D, A[2])
bump()
return {'ok', A[2]}

--- @op typecode
return {'ok', redis.call('HGET', M, 'check')}
