-- replay_place: put offered documents into their replay reservoir slots, letting the evicted ones go
-- (unless the buffer still holds them). Uses drop_doc from the _drop_doc.lua prelude.
-- KEYS: docs, buffer, lsh, stats, replay, replay_members
-- ARGV[1]: replay_seen the caller computed slots from; ARGV[2]: replay_seen after; then (slot, key, blob) triples.
-- Returns -1 if another writer moved replay_seen meanwhile (the caller recomputes), else the documents placed.
local docs, buffer, lsh, stats, slots, members = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if tonumber(redis.call('HGET', stats, 'replay_seen') or '0') ~= tonumber(ARGV[1]) then return -1 end
local placed = 0
for i = 3, #ARGV, 3 do
  local slot, key, blob = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', slots, slot)
  if old then
    redis.call('SREM', members, old)
    if not redis.call('ZSCORE', buffer, old) then
      local raw = redis.call('HGET', docs, old)
      if raw then drop_doc(docs, lsh, old, raw) end
    end
  end
  redis.call('HSET', slots, slot, key)
  redis.call('SADD', members, key)
  if redis.call('HEXISTS', docs, key) == 0 then
    redis.call('HSET', docs, key, blob)
    for _, b in ipairs(cjson.decode(blob).bands or {}) do redis.call('HSET', lsh, b, key) end
  end
  placed = placed + 1
end
redis.call('HSET', stats, 'replay_seen', ARGV[2])
return placed
