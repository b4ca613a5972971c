-- Appended to every operation script: run it, record its answer under the request id.
local reply = run()
if TOK ~= '' and reply[1] ~= 'again' then
  redis.call('HSET', R, TOK, cmsgpack.pack({SEQ, reply}))
  keep_request_id()
end
return reply
