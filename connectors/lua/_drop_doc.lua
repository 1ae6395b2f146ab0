-- Prelude (prepended at load time to remove_docs.lua and replay_place.lua; takes no KEYS/ARGV of its own).
-- drop_doc(docs, lsh, key, raw): let a document go: its record in `docs` and the LSH bands in `lsh`
-- still pointing at it (`raw` is its record JSON, read by the caller).
local function drop_doc(docs, lsh, key, raw)
  for _, b in ipairs(cjson.decode(raw).bands or {}) do
    if redis.call('HGET', lsh, b) == key then redis.call('HDEL', lsh, b) end
  end
  redis.call('HDEL', docs, key)
end
