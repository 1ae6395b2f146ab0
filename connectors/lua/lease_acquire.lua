-- lease_acquire: take the round lease, or renew it for its holder; a new holder gets a new epoch.
-- KEYS: lease, epoch
-- ARGV: owner, ttl ms
-- Returns the epoch held (new or renewed), or 0 if another owner holds it.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
