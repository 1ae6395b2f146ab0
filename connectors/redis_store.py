"""Everything cptd keeps in Redis, under `cptd:{name}:`.

The braces make `{name}` a Redis Cluster hash tag: every key of one
deployment lands in one slot, so the multi-key Lua scripts below work on a
cluster too, and several deployments can share one Redis.

Ingest writes a whole batch in one Lua call (documents, dedup keys, counters
and per-partition offsets together), so Redis either has all of a batch or
none of it. The stored offsets make redelivery harmless: a message at an
offset below the partition's stored "next offset" was already accounted for
and is skipped, which gives exact counts under at-least-once delivery, crash
restarts and consumer-group rebalances.

Keys:
  docs      HASH  content key -> document JSON (buffer and replay documents)
  buffer    ZSET  content key -> arrival sequence (documents waiting for a round)
  exact     ZSET  content key -> arrival sequence (exact-dedup memory, capped)
  lsh       HASH  band key -> content key (near-dedup index of live documents)
  counters  HASH  "outcome|reason" -> messages
  offsets   HASH  "topic|partition" -> next offset not yet accounted for
  stats     HASH  buffer_docs, buffer_bytes, seq, redelivered, replay_seen
  replay    HASH  reservoir slot -> content key (replay reservoir, Algorithm R, capped)
  replay_members SET content keys in the reservoir

A document record lives in `docs` while the buffer or the reservoir holds it;
its LSH bands live exactly as long, so near-dedup covers both (DESIGN.md §2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import redis

OUTCOMES = ("accepted", "duplicate", "near_duplicate", "rejected", "dead_lettered")

# ARGV[1]: JSON header {max_exact, items: [[tp, offset, outcome, reason, key, bytes, [band keys]] ...]}
# ARGV[2..]: one document JSON blob per item whose outcome is "candidate" (in order).
# Returns {"outcome|reason" per item..., buffer_docs, buffer_bytes}; outcome "skipped" = already accounted.
_WRITE_BATCH = """
local docs, buffer, exact, lsh, counters, offsets, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local hdr = cjson.decode(ARGV[1])
local out = {}
local blob = 1
local next_off = {}
for i, it in ipairs(hdr.items) do
  local tp, off, outcome, reason, key, nbytes, bands = it[1], it[2], it[3], it[4], it[5], it[6], it[7]
  if outcome == 'candidate' then blob = blob + 1 end
  local stored = next_off[tp]
  if stored == nil then stored = tonumber(redis.call('HGET', offsets, tp) or '-1') end
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
      end
    end
    out[i] = outcome .. '|' .. reason
    redis.call('HINCRBY', counters, out[i], 1)
    stored = off + 1
  end
  next_off[tp] = stored
  redis.call('HSET', offsets, tp, stored)
end
local excess = redis.call('ZCARD', exact) - hdr.max_exact
if excess > 0 then redis.call('ZREMRANGEBYRANK', exact, 0, excess - 1) end
out[#out + 1] = redis.call('HGET', stats, 'buffer_docs') or '0'
out[#out + 1] = redis.call('HGET', stats, 'buffer_bytes') or '0'
return out
"""

# Shared by the scripts that let a document go: its record and the LSH bands still pointing at it.
_LUA_DROP_DOC = """
local function drop_doc(docs, lsh, key, raw)
  for _, b in ipairs(cjson.decode(raw).bands or {}) do
    if redis.call('HGET', lsh, b) == key then redis.call('HDEL', lsh, b) end
  end
  redis.call('HDEL', docs, key)
end
"""

# KEYS: docs, buffer, lsh, stats, replay_members; ARGV: content keys to drop from the buffer.
# A document the replay reservoir also holds keeps its record and bands.
_REMOVE_DOCS = _LUA_DROP_DOC + """
local docs, buffer, lsh, stats, members = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local removed = 0
for _, key in ipairs(ARGV) do
  local raw = redis.call('HGET', docs, key)
  if raw then
    local d = cjson.decode(raw)
    if redis.call('ZREM', buffer, key) == 1 then
      redis.call('HINCRBY', stats, 'buffer_docs', -1)
      redis.call('HINCRBY', stats, 'buffer_bytes', -d.bytes)
    end
    if redis.call('SISMEMBER', members, key) == 0 then drop_doc(docs, lsh, key, raw) end
    removed = removed + 1
  end
end
return removed
"""

# KEYS: docs, buffer, lsh, stats, replay, replay_members
# ARGV[1]: replay_seen the caller computed slots from; ARGV[2]: replay_seen after; then (slot, key, blob) triples.
# Returns -1 if another writer moved replay_seen meanwhile (the caller recomputes), else the documents placed.
_REPLAY_PLACE = _LUA_DROP_DOC + """
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
"""


@dataclass(frozen=True)
class BatchItem:
    """One consumed message, with the outcome decided so far.

    outcome is "candidate" for a document that passed the filters (Redis decides
    accepted / duplicate / near_duplicate), else "rejected" or "dead_lettered".
    """

    topic: str
    partition: int
    offset: int
    outcome: str
    reason: str = ""
    key: str = ""
    nbytes: int = 0
    bands: tuple[str, ...] = ()
    doc: dict[str, Any] | None = None  # stored document record, candidates only


@dataclass(frozen=True)
class BatchResult:
    outcomes: list[str]  # per item: an OUTCOMES value or "skipped"
    reasons: list[str]  # per item: the reason counted with it ("" for accepted and skipped)
    buffer_docs: int
    buffer_bytes: int


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}|{partition}"


class RedisStore:
    def __init__(self, client: redis.Redis, name: str):
        self.r = client
        self.name = name
        p = f"cptd:{{{name}}}:"
        self.k_docs, self.k_buffer, self.k_exact, self.k_lsh = p + "docs", p + "buffer", p + "exact", p + "lsh"
        self.k_counters, self.k_offsets, self.k_stats = p + "counters", p + "offsets", p + "stats"
        self.k_replay, self.k_replay_members = p + "replay", p + "replay_members"
        self._write = client.register_script(_WRITE_BATCH)
        self._remove = client.register_script(_REMOVE_DOCS)
        self._replay_place = client.register_script(_REPLAY_PLACE)

    @classmethod
    def from_url(cls, url: str, name: str, **kw: Any) -> "RedisStore":
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("socket_connect_timeout", 5)
        return cls(redis.Redis.from_url(url, **kw), name)

    # --- ingest -------------------------------------------------------------
    def write_batch(self, items: Sequence[BatchItem], max_exact_keys: int) -> BatchResult:
        header = {
            "max_exact": max_exact_keys,
            "items": [[tp_key(i.topic, i.partition), i.offset, i.outcome, i.reason, i.key, i.nbytes, list(i.bands)] for i in items],
        }
        blobs = [json.dumps(i.doc, ensure_ascii=False, separators=(",", ":")) for i in items if i.outcome == "candidate"]
        keys = [self.k_docs, self.k_buffer, self.k_exact, self.k_lsh, self.k_counters, self.k_offsets, self.k_stats]
        res = self._write(keys=keys, args=[json.dumps(header, separators=(",", ":")), *blobs])
        res = [x.decode() if isinstance(x, bytes) else x for x in res]
        pairs = [r.partition("|")[::2] for r in res[:-2]]
        return BatchResult(outcomes=[o for o, _ in pairs], reasons=[r for _, r in pairs],
                           buffer_docs=int(res[-2]), buffer_bytes=int(res[-1]))

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        out = {}
        for k, v in self.r.hgetall(self.k_offsets).items():
            topic, _, part = k.decode().rpartition("|")
            out[(topic, int(part))] = int(v)
        return out

    def counters(self) -> dict[tuple[str, str], int]:
        out = {}
        for k, v in self.r.hgetall(self.k_counters).items():
            outcome, _, reason = k.decode().partition("|")
            out[(outcome, reason)] = int(v)
        return out

    def buffer_stats(self) -> dict[str, int]:
        raw = self.r.hgetall(self.k_stats)
        s = {k.decode(): int(v) for k, v in raw.items()}
        return {
            "buffer_docs": s.get("buffer_docs", 0),
            "buffer_bytes": s.get("buffer_bytes", 0),
            "redelivered": s.get("redelivered", 0),
            "exact_keys": self.r.zcard(self.k_exact),
            "lsh_keys": self.r.hlen(self.k_lsh),
        }

    # --- reading and draining the buffer ----------------------------------
    def buffer_keys(self, limit: int | None = None) -> list[str]:
        end = -1 if limit is None else limit - 1
        return [k.decode() for k in self.r.zrange(self.k_buffer, 0, end)]

    def get_docs(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        keys = list(keys)
        if not keys:
            return []
        return [json.loads(v) for v in self.r.hmget(self.k_docs, keys) if v is not None]

    def remove_docs(self, keys: Sequence[str]) -> int:
        """Drop documents from the buffer, and from the store with their near-dedup bands unless the replay
        reservoir holds them (their exact key stays remembered either way)."""
        if not keys:
            return 0
        return int(self._remove(keys=[self.k_docs, self.k_buffer, self.k_lsh, self.k_stats, self.k_replay_members], args=list(keys)))

    # --- replay reservoir ---------------------------------------------------
    def replay_offer(self, docs: Sequence[dict[str, Any]], cap: int, draw: Callable[[], float], slot_of: Callable[[int, int, float], int | None]) -> int:
        """Offer documents (records with "key" and "bands") to the reservoir; returns how many were placed.

        `slot_of(seen, cap, u)` is the sampling decision (policies.replay.reservoir_slot) and `draw()` its
        uniform draw; documents already in the reservoir are not offered twice.
        """
        fresh: dict[str, dict[str, Any]] = {}
        for d in docs:
            fresh.setdefault(d["key"], d)
        keys = list(fresh)
        if keys:
            member = self.r.smismember(self.k_replay_members, keys)
            keys = [k for k, m in zip(keys, member) if not m]
        while True:
            seen0 = int(self.r.hget(self.k_stats, "replay_seen") or 0)
            seen, args = seen0, []
            for k in keys:
                slot = slot_of(seen, cap, draw())
                seen += 1
                if slot is not None:
                    args += [slot, k, json.dumps(fresh[k], ensure_ascii=False, separators=(",", ":"))]
            keys6 = [self.k_docs, self.k_buffer, self.k_lsh, self.k_stats, self.k_replay, self.k_replay_members]
            placed = int(self._replay_place(keys=keys6, args=[seen0, seen, *args]))
            if placed >= 0:
                return placed

    def replay_stats(self) -> dict[str, int]:
        return {"replay_docs": self.r.hlen(self.k_replay), "replay_seen": int(self.r.hget(self.k_stats, "replay_seen") or 0)}

    def replay_keys(self) -> list[str]:
        return [k.decode() for k in self.r.hvals(self.k_replay)]

    def ping(self) -> bool:
        return bool(self.r.ping())
