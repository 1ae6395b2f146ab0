-- put_round: write a round record and/or the serving state, behind the _fence.lua prelude.
-- KEYS: lease, epoch, rounds, [serving]
-- ARGV: owner, epoch, round id ('' = no record), record JSON, [serving JSON]
-- Returns 1.
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[3], ARGV[4]) end
if ARGV[5] then redis.call('SET', KEYS[4], ARGV[5]) end
return 1
