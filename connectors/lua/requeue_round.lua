-- requeue_round: a round that failed before it could be used gives its documents back to the front of the
-- buffer (in their order), behind the _fence.lua prelude; the round's list is deleted.
-- KEYS: lease, epoch, docs, buffer, stats, round list
-- ARGV: owner, epoch
-- Returns the documents put back.
local docs, buffer, stats, lst = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local keys = redis.call('LRANGE', lst, 0, -1)
local back = 0
for i, key in ipairs(keys) do
  local raw = redis.call('HGET', docs, key)
  if raw and redis.call('ZADD', buffer, 'NX', -#keys + i - 1, key) == 1 then
    redis.call('HINCRBY', stats, 'buffer_docs', 1)
    redis.call('HINCRBY', stats, 'buffer_bytes', cjson.decode(raw).bytes)
    back = back + 1
  end
end
redis.call('DEL', lst)
return back
