-- Prelude (prepended at load time to write_batch.lua and echo_add.lua; takes no KEYS/ARGV of its own).
-- The echo index of the served model's completions (policies/collapse.py):
--   echo_add(echo_lsh, echo, echo_bands, stats, key, bands): index one completion once (its band keys -> key);
--   echo_evict(echo_lsh, echo, echo_bands, max): drop the oldest completions beyond `max`, with their band keys.
local function echo_add(echo_lsh, echo, echo_bands, stats, key, bands)
  if redis.call('ZSCORE', echo, key) then return 0 end
  redis.call('ZADD', echo, redis.call('HINCRBY', stats, 'echo_seq', 1), key)
  redis.call('HSET', echo_bands, key, table.concat(bands, ','))
  for _, b in ipairs(bands) do redis.call('HSET', echo_lsh, b, key) end
  return 1
end

local function echo_evict(echo_lsh, echo, echo_bands, max)
  local over = redis.call('ZCARD', echo) - max
  if over <= 0 then return end
  for _, old in ipairs(redis.call('ZRANGE', echo, 0, over - 1)) do
    for b in string.gmatch(redis.call('HGET', echo_bands, old) or '', '[^,]+') do
      if redis.call('HGET', echo_lsh, b) == old then redis.call('HDEL', echo_lsh, b) end
    end
    redis.call('HDEL', echo_bands, old)
    redis.call('ZREM', echo, old)
  end
end
