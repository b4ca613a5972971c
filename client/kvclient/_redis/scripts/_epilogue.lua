-- Appended to every operation script: run it, record its answer under the request id.
local reply = run()
if TOK ~= '' and reply[1] ~= 'again' then
  keep_request_id(cmsgpack.pack({SEQ, reply}))
end
return reply
