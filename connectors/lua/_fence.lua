-- Prelude (prepended at load time to every lease-holder write: put_round, snapshot_take, requeue_round):
-- the fencing check. Fails the whole call with a "FENCED ..." error unless the caller still holds the lease.
-- KEYS[1]: lease, KEYS[2]: epoch; ARGV[1]: owner, ARGV[2]: epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('FENCED lease lost: held by ' .. tostring(redis.call('GET', KEYS[1])))
end
