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
  lease     STRING owner id of the daemon that runs rounds (PX = lease TTL)
  epoch     STRING fencing token: incremented every time the lease changes hands
  rounds    HASH  round id -> round record JSON (lineage); round_seq STRING last round number
  round:ID:docs LIST content keys a round took from the buffer at SNAPSHOT
  serving   STRING ServingState JSON (what each vLLM replica serves)
  requests  HASH  request id -> JSON (round requests from the API, taken by the lease holder)
  request_results HASH request id -> JSON (the round it started, or why not)
  cancel    SET   round ids an operator asked to cancel

Round state is written only by the lease holder, and every such write checks
(in the same Lua call) that the lease and the epoch are still the writer's:
a daemon that lost the lease while paused (GC, network) cannot overwrite the
new holder's state.

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


# The fencing check every lease-holder write starts with. KEYS[1] lease, KEYS[2] epoch; ARGV[1] owner, ARGV[2] epoch.
_LUA_FENCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('FENCED lease lost: held by ' .. tostring(redis.call('GET', KEYS[1])))
end
"""

# KEYS: lease, epoch; ARGV: owner, ttl ms. Returns the epoch held (new or renewed), or 0 if another owner holds it.
_LEASE_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""

# KEYS: lease, epoch, rounds, [serving]; ARGV: owner, epoch, round id, record JSON, [serving JSON]
_PUT_ROUND = _LUA_FENCE + """
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[3], ARGV[4]) end
if ARGV[5] then redis.call('SET', KEYS[4], ARGV[5]) end
return 1
"""

# KEYS: lease, epoch, docs, buffer, stats, round list; ARGV: owner, epoch, budget bytes, max docs.
# Moves the oldest buffered documents, up to the byte budget (at least one), into the round's list.
# Idempotent: a round that already has its list gets the same list back, nothing moves twice.
_SNAPSHOT = _LUA_FENCE + """
local docs, buffer, stats, lst = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', lst) == 1 then return redis.call('LRANGE', lst, 0, -1) end
local budget, max_docs = tonumber(ARGV[3]), tonumber(ARGV[4])
local taken, used = {}, 0
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
redis.call('HINCRBY', stats, 'buffer_docs', -#taken)
redis.call('HINCRBY', stats, 'buffer_bytes', -used)
return taken
"""

# KEYS: lease, epoch, docs, buffer, stats, round list; ARGV: owner, epoch.
# A round that failed before it could be used gives its documents back to the front of the buffer.
_REQUEUE = _LUA_FENCE + """
local docs, buffer, stats, lst = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local keys = redis.call('LRANGE', lst, 0, -1)
local back = 0
for i, key in ipairs(keys) do
  local raw = redis.call('HGET', docs, key)
  if raw and redis.call('ZADD', buffer, 'NX', -#keys + i - 1, key) == 1 then
    redis.call('HINCRBY', stats, 'buffer_docs', 1)
    redis.call('HINCRBY', stats, 'buffer_bytes', cjson.decode(raw).bytes)
    back = back + 1
  end
end
redis.call('DEL', lst)
return back
"""


class Fenced(RuntimeError):
    """This daemon no longer holds the round lease; the write was refused."""


@dataclass(frozen=True)
class Fence:
    owner: str
    epoch: int


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
        self.k_lease, self.k_epoch, self.k_rounds, self.k_round_seq = p + "lease", p + "epoch", p + "rounds", p + "round_seq"
        self.k_serving, self.k_requests, self.k_request_results, self.k_cancel = p + "serving", p + "requests", p + "request_results", p + "cancel"
        self._prefix = p
        self._lease_acquire = client.register_script(_LEASE_ACQUIRE)
        self._put_round = client.register_script(_PUT_ROUND)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._requeue = client.register_script(_REQUEUE)

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

    def get_docs_by_key(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """Records in the order of `keys`, None where a record is gone."""
        if not keys:
            return []
        return [json.loads(v) if v is not None else None for v in self.r.hmget(self.k_docs, list(keys))]

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

    # --- lease (one round runner per deployment) ------------------------------
    def lease_acquire(self, owner: str, ttl_s: float) -> Fence | None:
        """Take or renew the lease; None while another owner holds it."""
        epoch = int(self._lease_acquire(keys=[self.k_lease, self.k_epoch], args=[owner, max(1, int(ttl_s * 1000))]))
        return Fence(owner, epoch) if epoch else None

    def lease_release(self, fence: Fence) -> None:
        """Hand the lease back at shutdown so another daemon takes over at once instead of after the TTL."""
        self.r.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                    1, self.k_lease, fence.owner)

    def lease_holder(self) -> tuple[str | None, int]:
        holder, epoch = self.r.mget(self.k_lease, self.k_epoch)
        return (holder.decode() if holder else None), int(epoch or 0)

    def _fenced(self, script, fence: Fence, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=[self.k_lease, self.k_epoch, *keys], args=[fence.owner, fence.epoch, *args])
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                raise Fenced(str(e).split("FENCED ", 1)[-1]) from None
            raise

    # --- rounds -----------------------------------------------------------------
    def next_round_number(self) -> int:
        return int(self.r.incr(self.k_round_seq))

    def put_round(self, fence: Fence, round_id: str, record: dict[str, Any], serving: str | None = None) -> None:
        args: list[Any] = [round_id, json.dumps(record, sort_keys=True, default=str)]
        keys = [self.k_rounds]
        if serving is not None:
            args.append(serving)
            keys.append(self.k_serving)
        self._fenced(self._put_round, fence, keys, args)

    def put_serving(self, fence: Fence, serving: str) -> None:
        self._fenced(self._put_round, fence, [self.k_rounds, self.k_serving], ["", "", serving])

    def get_serving(self) -> str | None:
        v = self.r.get(self.k_serving)
        return v.decode() if v else None

    def get_round(self, round_id: str) -> dict[str, Any] | None:
        v = self.r.hget(self.k_rounds, round_id)
        return json.loads(v) if v else None

    def list_rounds(self) -> list[dict[str, Any]]:
        """All round records, oldest first (ids sort by their number)."""
        return sorted((json.loads(v) for v in self.r.hvals(self.k_rounds)), key=lambda r: r.get("number", 0))

    def round_list_key(self, round_id: str) -> str:
        return f"{self._prefix}round:{round_id}:docs"

    def snapshot_take(self, fence: Fence, round_id: str, budget_bytes: int, max_docs: int = 10_000_000) -> list[str]:
        keys = [self.k_docs, self.k_buffer, self.k_stats, self.round_list_key(round_id)]
        return [k.decode() for k in self._fenced(self._snapshot, fence, keys, [int(budget_bytes), int(max_docs)])]

    def round_docs(self, round_id: str) -> list[str]:
        return [k.decode() for k in self.r.lrange(self.round_list_key(round_id), 0, -1)]

    def requeue_round(self, fence: Fence, round_id: str) -> int:
        return int(self._fenced(self._requeue, fence, [self.k_docs, self.k_buffer, self.k_stats, self.round_list_key(round_id)], []))

    def drop_round_list(self, fence: Fence, round_id: str) -> None:
        """After the round's documents were released (replay offer + remove_docs)."""
        self._fenced(self._put_round, fence, [self.k_rounds], ["", ""])  # fencing check only
        self.r.delete(self.round_list_key(round_id))

    # --- operator requests (any daemon accepts them, the lease holder acts) -------
    def add_request(self, request_id: str, request: dict[str, Any]) -> None:
        self.r.hset(self.k_requests, request_id, json.dumps(request))

    def take_requests(self) -> dict[str, dict[str, Any]]:
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.k_requests)
        pipe.delete(self.k_requests)
        raw, _ = pipe.execute()
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def set_request_result(self, request_id: str, result: dict[str, Any]) -> None:
        self.r.hset(self.k_request_results, request_id, json.dumps(result))

    def request_result(self, request_id: str) -> dict[str, Any] | None:
        v = self.r.hget(self.k_request_results, request_id)
        return json.loads(v) if v else None

    def request_cancel(self, round_id: str) -> None:
        self.r.sadd(self.k_cancel, round_id)

    def cancel_requested(self, round_id: str) -> bool:
        return bool(self.r.sismember(self.k_cancel, round_id))

    def ping(self) -> bool:
        return bool(self.r.ping())
