-- write_batch: one ingest batch in one call, behind the _echo_index.lua prelude (documents, dedup keys, counters and per-partition offsets),
-- so Redis has all of a batch or none of it.
-- KEYS: docs, buffer, exact, lsh, counters, offsets, stats, echo_lsh, echo, echo_bands, provenance
-- ARGV[1]: JSON header {max_exact, max_echo, accept_gaps: {partition_key: offset}, items: [[partition_key, offset, outcome,
--   reason, key, bytes, [band keys], class] ...]}
--   class: a candidate's provenance class (counted in `provenance` when accepted); echo: 1 when the message near-duplicates
--   an indexed completion, whatever its outcome (counted as `provenance.echoes`); outcome "indexed": a completion of
--   the served model (collapse.echo_topics) whose band keys go into the echo index, capped at max_echo (oldest evicted).
-- ARGV[2..]: one document JSON blob per item whose outcome is "candidate" (in order).
-- Returns {"outcome|reason" per item..., buffer_docs, buffer_bytes}; outcome "skipped" = already accounted.
-- A hole: a partition's first unaccounted offset in the batch above its stored next offset (Redis lost the batches in
-- between while Kafka kept their commit). The whole batch is refused before anything is written, returning
-- {"gap", partition_key, stored, first, ...} per hole; the caller re-reads from the stored offset. A hole the caller met
-- right after seeking to exactly the stored offset (accept_gaps[partition_key] == stored: Kafka has nothing there, as
-- after compaction, transaction markers or retention) is accepted, counted in stats offset_gaps / gap_offsets.
local docs, buffer, exact, lsh, counters, offsets, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local echo_lsh, echo, echo_bands, provenance = KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local hdr = cjson.decode(ARGV[1])
local out = {}
local blob = 1
local next_off = {}
local accept_gaps = hdr.accept_gaps or {}
local gaps, accepted, first_seen = {}, {}, {}
for _, it in ipairs(hdr.items) do
  local partition_key, off = it[1], it[2]
  if not first_seen[partition_key] then
    local stored = tonumber(redis.call('HGET', offsets, partition_key) or '-1')
    if off >= stored then
      first_seen[partition_key] = true
      if stored >= 0 and off > stored then
        if accept_gaps[partition_key] == stored then
          accepted[#accepted + 1] = off - stored
        else
          for _, v in ipairs({'gap', partition_key, stored, off}) do gaps[#gaps + 1] = v end
        end
      end
    end
  end
end
if #gaps > 0 then return gaps end
for _, n in ipairs(accepted) do
  redis.call('HINCRBY', stats, 'offset_gaps', 1)
  redis.call('HINCRBY', stats, 'gap_offsets', n)
end
for i, it in ipairs(hdr.items) do
  local partition_key, off, outcome, reason, key = it[1], it[2], it[3], it[4], it[5]
  local nbytes, bands, class, is_echo = it[6], it[7], it[8], it[9]
  if outcome == 'candidate' then blob = blob + 1 end
  local stored = next_off[partition_key]
  if stored == nil then stored = tonumber(redis.call('HGET', offsets, partition_key) or '-1') end
  if off < stored then
    out[i] = 'skipped|'
    redis.call('HINCRBY', stats, 'redelivered', 1)
  else
    if outcome == 'candidate' then
      if redis.call('HEXISTS', docs, key) == 1 or redis.call('ZSCORE', exact, key) then
        outcome, reason = 'duplicate', 'exact_match'
      else
        for _, b in ipairs(bands) do
          local other = redis.call('HGET', lsh, b)
          if other and redis.call('HEXISTS', docs, other) == 1 then
            outcome, reason = 'near_duplicate', 'minhash_lsh'
            break
          end
        end
      end
      if outcome == 'candidate' then
        outcome, reason = 'accepted', ''
        local seq = redis.call('HINCRBY', stats, 'seq', 1)
        redis.call('HSET', docs, key, ARGV[blob])
        redis.call('ZADD', buffer, seq, key)
        redis.call('ZADD', exact, seq, key)
        for _, b in ipairs(bands) do redis.call('HSET', lsh, b, key) end
        redis.call('HINCRBY', stats, 'buffer_docs', 1)
        redis.call('HINCRBY', stats, 'buffer_bytes', nbytes)
        if class and class ~= '' then redis.call('HINCRBY', provenance, class, 1) end
      end
    elseif outcome == 'indexed' then
      echo_add(echo_lsh, echo, echo_bands, stats, key, bands)
    end
    out[i] = outcome .. '|' .. reason
    if is_echo == 1 then redis.call('HINCRBY', provenance, 'echoes', 1) end
    redis.call('HINCRBY', counters, out[i], 1)
    stored = off + 1
  end
  next_off[partition_key] = stored
  redis.call('HSET', offsets, partition_key, stored)
end
local excess = redis.call('ZCARD', exact) - hdr.max_exact
if excess > 0 then redis.call('ZREMRANGEBYRANK', exact, 0, excess - 1) end
echo_evict(echo_lsh, echo, echo_bands, hdr.max_echo)
out[#out + 1] = redis.call('HGET', stats, 'buffer_docs') or '0'
out[#out + 1] = redis.call('HGET', stats, 'buffer_bytes') or '0'
return out
