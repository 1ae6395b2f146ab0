-- next_round: the next round number, above both the stored last one and a floor the caller read from disk
-- (the highest round directory on the checkpoint volume), so a Redis that lost round_seq never repeats an id.
-- KEYS[1]: round_seq; ARGV[1]: floor (0 = none). Returns the new number, stored as the last one.
local n = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], n)
return n
