-- remove_docs: drop documents from the buffer; a document the replay reservoir also holds keeps its record
-- and bands. Uses drop_doc from the _drop_doc.lua prelude.
-- KEYS: docs, buffer, lsh, stats, replay_members
-- ARGV: content keys to drop from the buffer.
-- Returns the number of keys that still had a record.
local docs, buffer, lsh, stats, members = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local removed = 0
for _, key in ipairs(ARGV) do
  local raw = redis.call('HGET', docs, key)
  if raw then
    local d = cjson.decode(raw)
    if redis.call('ZREM', buffer, key) == 1 then
      redis.call('HINCRBY', stats, 'buffer_docs', -1)
      redis.call('HINCRBY', stats, 'buffer_bytes', -d.bytes)
    end
    if redis.call('SISMEMBER', members, key) == 0 then drop_doc(docs, lsh, key, raw) end
    removed = removed + 1
  end
end
return removed
