-- snapshot_take: move the oldest buffered documents, up to the byte budget (at least one), into the round's
-- list, behind the _fence.lua prelude. Idempotent: a round that already has its list gets the same list back,
-- nothing moves twice.
-- KEYS: lease, epoch, docs, buffer, stats, round list
-- ARGV: owner, epoch, budget bytes, max docs[, key...]: with keys (a curated selection, policies/curation.py) exactly
-- those still buffered move, in the order given, whatever the budget.
-- Returns the content keys the round took, oldest first.
local docs, buffer, stats, lst = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', lst) == 1 then return redis.call('LRANGE', lst, 0, -1) end
local budget, max_docs = tonumber(ARGV[3]), tonumber(ARGV[4])
local taken, used = {}, 0
if #ARGV > 4 then
  for i = 5, #ARGV do
    local key = ARGV[i]
    if redis.call('ZSCORE', buffer, key) then
      local raw = redis.call('HGET', docs, key)
      taken[#taken + 1] = key
      used = used + (raw and cjson.decode(raw).bytes or 0)
    end
  end
  max_docs = 0
end
local batch = 256
local start = 0
while #taken < max_docs do
  local keys = redis.call('ZRANGE', buffer, start, start + batch - 1)
  if #keys == 0 then break end
  for _, key in ipairs(keys) do
    local raw = redis.call('HGET', docs, key)
    local n = raw and cjson.decode(raw).bytes or 0
    if #taken > 0 and used + n > budget then max_docs = #taken break end
    taken[#taken + 1] = key
    used = used + n
    if #taken >= max_docs then break end
  end
  start = start + batch
end
for _, key in ipairs(taken) do
  redis.call('ZREM', buffer, key)
  redis.call('RPUSH', lst, key)
end
redis.call('HINCRBY', stats, 'buffer_docs', 0 - #taken)  -- not -#taken: Lua writes -0 as "-0", which HINCRBY refuses
redis.call('HINCRBY', stats, 'buffer_bytes', 0 - used)
return taken
