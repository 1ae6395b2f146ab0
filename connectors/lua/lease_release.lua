-- lease_release: hand the lease back, only if the caller still holds it.
-- KEYS: lease
-- ARGV: owner
-- Returns 1 if the lease was deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0
