"""Everything cptd keeps in Redis, under `cptd:{name}:`.

The braces make `{name}` a Redis Cluster hash tag: every key of one
deployment lands in one slot, so the multi-key Lua scripts (connectors/lua/) work
on a cluster too, and several deployments can share one Redis.

Ingest writes a whole batch in one Lua call (documents, dedup keys, counters
and per-partition offsets together), so Redis either has all of a batch or
none of it. The stored offsets make redelivery harmless: a message at an
offset below the partition's stored "next offset" was already accounted for
and is skipped, which gives exact counts under at-least-once delivery, crash
restarts and consumer-group rebalances. A batch starting above the stored
offset (Redis lost the batches in between) is refused whole (`OffsetGap`).

Keys:
  docs      HASH  content key -> document JSON (buffer and replay documents)
  buffer    ZSET  content key -> arrival sequence (documents waiting for a round)
  exact     ZSET  content key -> arrival sequence (exact-dedup memory, capped)
  lsh       HASH  band key -> content key (near-dedup index of live documents)
  counters  HASH  "outcome|reason" -> messages
  offsets   HASH  "topic|partition" -> next offset not yet accounted for
  inflight  HASH  "topic|partition" -> JSON marker of the batch being processed (crash-loop guard, daemon/ingest.py)
  stats     HASH  buffer_docs, buffer_bytes, seq, redelivered, replay_seen, echo_seq, offset_gaps, gap_offsets
  provenance HASH class (human, unknown, synthetic) -> documents accepted with it; echoes -> messages found to echo a completion
  echo_lsh  HASH  echo band key -> completion key (echo index of the served model's outputs, policies/collapse.py)
  echo      ZSET  completion key -> arrival sequence (capped at collapse.echo_max_docs, oldest evicted)
  echo_bands HASH completion key -> its band keys, comma-separated (to evict them)
  passes    HASH  content key -> rounds that passed the buffered document over (policies/curation.py)
  replay    HASH  reservoir slot -> content key (replay reservoir, Algorithm R, capped)
  replay_members SET content keys in the reservoir
  lease     STRING owner id of the daemon that runs rounds (PX = lease TTL)
  epoch     STRING fencing token: incremented every time the lease changes hands
  rounds    HASH  round id -> round record JSON (lineage): the newest rounds.keep_records finished ones, the
            unfinished ones and those serving still needs (older ones are archived on disk, daemon/rounds/retention.py);
            round_seq STRING last round number
  identity  STRING JSON {id, created_at} of this deployment's Redis history; a copy lives on the checkpoint volume
            (daemon/redis_loss.py: a Redis that lost it, or holds another, lost data)
  round:ID:docs LIST content keys a round took from the buffer at SNAPSHOT
  serving   STRING ServingState JSON (what each vLLM replica serves)
  requests  HASH  request id -> JSON (round requests from the API, taken by the lease holder)
  request_result:ID STRING JSON (the round request ID started, or why not); expires after REQUEST_RESULT_TTL_S
  cancel    SET   round ids an operator asked to cancel (a finished round's mark is removed at its end)
  approvals HASH  round id -> JSON {decision, by, note, at}: an operator's decision on a round waiting in
                  AWAITING_APPROVAL (the first one stands; removed when its round has ended)
  control   HASH  request id -> JSON (leader-only operator requests such as a rollback, sent to any daemon, taken by the
                  lease holder; the answer goes to request_result:ID)
  ingest_pause STRING JSON {by, at}: the operator's ingest pause, read by every daemon's ingest loop at its batch boundary

Round state is written only by the lease holder, and every such write checks
(in the same Lua call) that the lease and the epoch are still the writer's:
a daemon that lost the lease while paused (GC, network) cannot overwrite the
new holder's state.

A document record lives in `docs` while the buffer or the reservoir holds it;
its LSH bands live exactly as long, so near-dedup covers both (docs/architecture.md §2).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel, ConfigDict
from redis.commands.core import Script
from redis.credentials import CredentialProvider


# "indexed": a completion of the served model from collapse.echo_topics, kept in the echo index, never trained on.
class StoredDoc(BaseModel):
    """A document record as `docs` holds it (written by ingest or `cptd seed-replay`), with its content key.

    Rounds read the buffer and the reservoir through this one model, so a field is read by name and a record
    missing `text` or `bytes` fails where it is read, naming the field. Fields ingest adds later survive a
    read and rewrite (extra="allow")."""

    model_config = ConfigDict(extra="allow")
    key: str = ""  # the content key (blake2b-128 of the normalised text): the hash field, not stored inside
    text: str
    bytes: int
    id: str | None = None
    source: str | None = None
    language: str | None = None  # as the language rule saw it
    provenance: str | None = None  # human | unknown | synthetic
    domain: str | None = None
    bands: list[str] = []
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    def record(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude={"key"}), ensure_ascii=False, separators=(",", ":"))


def _doc(key: str, blob: bytes | str) -> StoredDoc:
    return StoredDoc.model_validate({**json.loads(blob), "key": key})


# How long the answer to an operator's round request is kept (the API that took the request waits seconds for it).
REQUEST_RESULT_TTL_S = 24 * 3600


def round_number(round_id: str) -> int:
    """The number in a round id (r00042 -> 42): ids sort by it, and a number outgrows the five digits."""
    digits = "".join(c for c in round_id if c.isdigit())
    return int(digits) if digits else 0


OUTCOMES = ("accepted", "duplicate", "near_duplicate", "rejected", "dead_lettered", "indexed")

# The Lua scripts live in connectors/lua/, one file each (its header says KEYS, ARGV and the return value).
# A script that needs a shared helper gets the helper's file prepended here, so each helper has one source.
_LUA_DIR = resources.files("connectors") / "lua"
_DROP_DOC = "_drop_doc.lua"  # drop_doc(): a document's record and the LSH bands still pointing at it
_FENCE = "_fence.lua"  # the fencing check every lease-holder write starts with
_ECHO_INDEX = "_echo_index.lua"  # echo_add() / echo_evict(): the echo index of the served model's completions


@functools.cache
def lua_source(name: str, *preludes: str) -> str:
    """The text of connectors/lua/`name`, after the text of each prelude file, in order."""
    return "".join((_LUA_DIR / f).read_text(encoding="utf-8") for f in (*preludes, name))


class OffsetGap(RuntimeError):
    """write_batch refused a batch: a partition's first unaccounted offset is above its stored next offset.

    Redis lost the batches in between (a restart that lost its last second) while Kafka had their offsets committed;
    the caller re-reads the partition from the stored offset. `gaps`: (topic, partition) -> (stored, first offset)."""

    def __init__(self, gaps: dict[tuple[str, int], tuple[int, int]]):
        super().__init__(
            "offset gap: " + ", ".join(f"{t}/{p} stored next offset {s}, batch starts at {f}" for (t, p), (s, f) in sorted(gaps.items()))
        )
        self.gaps = gaps


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
    bands: tuple[str, ...] = ()  # candidates: LSH band keys; indexed: echo band keys
    doc: dict[str, Any] | bytes | None = None  # stored document record (or its UTF-8 JSON), candidates only
    provenance: str = ""  # candidates: provenance class, counted when accepted
    echo: bool = False  # near-duplicates an indexed completion of the served model (counted whatever the outcome)


@dataclass(frozen=True)
class BatchResult:
    outcomes: list[str]  # per item: an OUTCOMES value or "skipped"
    reasons: list[str]  # per item: the reason counted with it ("" for accepted and skipped)
    buffer_docs: int
    buffer_bytes: int


def partition_key(topic: str, partition: int) -> str:
    return f"{topic}|{partition}"


def _text(v: bytes | str) -> str:
    """A Redis reply as text (the client may or may not decode replies itself)."""
    return v.decode() if isinstance(v, bytes) else v


class FileCredentials(CredentialProvider):
    """An ACL username and a password read from a mounted Secret file at every (re)connect, so a rotated password is used."""

    def __init__(self, username: str | None, password_file: Path):
        self.username = username
        self.password_file = Path(password_file)

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        pw = self.password_file.read_text().strip()
        return (self.username, pw) if self.username else (pw,)

    def __repr__(self) -> str:
        return f"FileCredentials({self.username!r}, {str(self.password_file)!r})"


# The commands cptd sends, directly and from its Lua scripts (connectors/lua/*.lua): a Redis ACL user needs exactly
# these, on the keys `cptd:{NAME}:*` (acl_rule). tests/test_secure_connections.py checks the list against the code.
ACL_COMMANDS = (
    # connection and scripts (redis-py's register_script: EVALSHA, then SCRIPT LOAD/EVAL when the cache is cold)
    "ping", "select", "evalsha", "eval", "script|load", "multi", "exec",
    # server memory for the cptd_redis_* gauges (INFO memory; INFO has no per-section ACL, it is read-only)
    "info",
    # strings, hashes, lists, sets, sorted sets
    "get", "set", "mget", "incr", "incrby", "del", "exists", "pexpire",
    "hget", "hset", "hsetnx", "hgetall", "hlen", "hmget", "hvals", "hkeys", "hdel", "hexists", "hincrby",
    "lrange", "rpush",
    "sadd", "srem", "sismember", "smismember", "smembers",
    "zadd", "zcard", "zrange", "zrem", "zremrangebyrank", "zscore",
)  # fmt: skip


def acl_rule(name: str) -> str:
    """The ACL rules of a deployment named `name` (the policy file's `name`): its key prefix and ACL_COMMANDS, nothing else."""
    return f"resetkeys ~cptd:{{{name}}}:* resetchannels -@all " + " ".join(f"+{c}" for c in ACL_COMMANDS)


def connect(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    password_file: Path | None = None,
    ssl_ca_file: Path | None = None,
    ssl_cert_file: Path | None = None,
    ssl_key_file: Path | None = None,
    ssl_check_hostname: bool = True,
    **kw: Any,
) -> redis.Redis:
    """The one Redis client construction: `redis://` or `rediss://` (TLS, verified against `ssl_ca_file` or the
    system CAs; `ssl_cert_file`+`ssl_key_file` for mTLS) and an ACL user from the URL's userinfo, or else from
    `username` with `password` / `password_file`. Connects lazily: nothing here touches the network."""
    kw.setdefault("socket_timeout", 10)
    kw.setdefault("socket_connect_timeout", 5)
    if url.startswith("rediss://"):
        kw.setdefault("ssl_cert_reqs", "required")
        kw.setdefault("ssl_check_hostname", ssl_check_hostname)
        if ssl_ca_file is not None:
            kw.setdefault("ssl_ca_certs", str(ssl_ca_file))
        if ssl_cert_file is not None:
            kw.setdefault("ssl_certfile", str(ssl_cert_file))
            kw.setdefault("ssl_keyfile", str(ssl_key_file) if ssl_key_file else None)
    elif ssl_ca_file or ssl_cert_file:
        raise ValueError(f"redis {_safe_url(url)}: TLS files are set but the URL is not rediss://")
    u = urlsplit(url)
    if not (u.username or u.password):  # the URL's userinfo wins; otherwise the separate settings
        if password_file is not None:
            kw.setdefault("credential_provider", FileCredentials(username, password_file))
        elif password is not None:
            kw.setdefault("username", username)
            kw.setdefault("password", password)
    return redis.Redis.from_url(url, **kw)


def _safe_url(url: str) -> str:
    u = urlsplit(url)
    host = f"[{u.hostname}]" if u.hostname and ":" in u.hostname else (u.hostname or "")
    return f"{u.scheme}://{host}{f':{u.port}' if u.port else ''}{u.path if u.path not in ('', '/') else ''}"


def where(client: redis.Redis) -> str:
    """A client's server as scheme://host:port/db, without credentials (for messages and /readyz)."""
    kw = client.connection_pool.connection_kwargs
    scheme = "rediss" if issubclass(client.connection_pool.connection_class, redis.SSLConnection) else "redis"
    if kw.get("path"):
        return f"unix://{kw['path']}"
    return f"{scheme}://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisStore:
    def __init__(self, client: redis.Redis, name: str):
        self.r = client
        self.name = name
        p = f"cptd:{{{name}}}:"
        self.k_docs, self.k_buffer, self.k_exact, self.k_lsh = p + "docs", p + "buffer", p + "exact", p + "lsh"
        self.k_counters, self.k_offsets, self.k_stats = p + "counters", p + "offsets", p + "stats"
        self.k_inflight = p + "inflight"
        self.k_provenance, self.k_passes = p + "provenance", p + "passes"
        self.k_echo_lsh, self.k_echo, self.k_echo_bands = p + "echo_lsh", p + "echo", p + "echo_bands"
        self.k_replay, self.k_replay_members = p + "replay", p + "replay_members"
        self._write = client.register_script(lua_source("write_batch.lua", _ECHO_INDEX))
        self._echo_add = client.register_script(lua_source("echo_add.lua", _ECHO_INDEX))
        self._remove = client.register_script(lua_source("remove_docs.lua", _DROP_DOC))
        self._replay_place = client.register_script(lua_source("replay_place.lua", _DROP_DOC))
        self.k_lease, self.k_epoch, self.k_rounds, self.k_round_seq = p + "lease", p + "epoch", p + "rounds", p + "round_seq"
        self.k_serving, self.k_requests, self.k_cancel = p + "serving", p + "requests", p + "cancel"
        self.k_control, self.k_ingest_pause = p + "control", p + "ingest_pause"
        self.k_identity, self.k_approvals = p + "identity", p + "approvals"
        self.k_tracking = p + "tracking_pending"
        self._next_round = client.register_script(lua_source("next_round.lua"))
        self._prefix = p
        self._lease_acquire = client.register_script(lua_source("lease_acquire.lua"))
        self._lease_release = client.register_script(lua_source("lease_release.lua"))
        self._put_round = client.register_script(lua_source("put_round.lua", _FENCE))
        self._snapshot = client.register_script(lua_source("snapshot_take.lua", _FENCE))
        self._requeue = client.register_script(lua_source("requeue_round.lua", _FENCE))

    @classmethod
    def from_url(cls, url: str, name: str, **kw: Any) -> RedisStore:
        return cls(connect(url, **kw), name)

    def where(self) -> str:
        """This store's server as it may be shown: scheme, host, port and database, never the credentials."""
        return where(self.r)

    # --- ingest -------------------------------------------------------------
    def write_batch(
        self,
        items: Sequence[BatchItem],
        max_exact_keys: int,
        max_echo: int = 200_000,
        accept_gaps: Mapping[tuple[str, int], int] | None = None,
    ) -> BatchResult:
        """Account a batch; OffsetGap (nothing written) when it starts above a partition's stored next offset, unless
        `accept_gaps` names that partition with exactly that stored offset (the caller re-read from it: a real hole)."""
        header = {
            "max_exact": max_exact_keys,
            "max_echo": max_echo,
            "accept_gaps": {partition_key(t, p): o for (t, p), o in (accept_gaps or {}).items()},
            "items": [
                [
                    partition_key(i.topic, i.partition),
                    i.offset,
                    i.outcome,
                    i.reason,
                    i.key,
                    i.nbytes,
                    list(i.bands),
                    i.provenance,
                    int(i.echo),
                ]
                for i in items
            ],
        }
        blobs = [
            i.doc if isinstance(i.doc, bytes) else json.dumps(i.doc, ensure_ascii=False, separators=(",", ":"))
            for i in items
            if i.outcome == "candidate"
        ]
        keys = [self.k_docs, self.k_buffer, self.k_exact, self.k_lsh, self.k_counters, self.k_offsets, self.k_stats]
        keys += [self.k_echo_lsh, self.k_echo, self.k_echo_bands, self.k_provenance]
        res = self._write(keys=keys, args=[json.dumps(header, separators=(",", ":")), *blobs])
        res = [_text(x) if isinstance(x, (bytes, str)) else x for x in res]
        if res and res[0] == "gap":
            gaps = {}
            for i in range(0, len(res), 4):
                topic, _, part = str(res[i + 1]).rpartition("|")
                gaps[(topic, int(part))] = (int(res[i + 2]), int(res[i + 3]))
            raise OffsetGap(gaps)
        res = [str(x) for x in res]
        pairs = [r.partition("|")[::2] for r in res[:-2]]
        return BatchResult(
            outcomes=[o for o, _ in pairs], reasons=[r for _, r in pairs], buffer_docs=int(res[-2]), buffer_bytes=int(res[-1])
        )

    def echo_lookup(self, keys: Sequence[Sequence[str]]) -> list[list[str | None]]:
        """Per document, the indexed completion under each of its echo keys (band or sampled shingle), in one HMGET
        of the batch's distinct keys (documents of one domain share many shingles; packing the command is most of
        the cost)."""
        distinct = list(dict.fromkeys(k for ks in keys for k in ks))
        values = self.r.hmget(self.k_echo_lsh, distinct) if distinct else []
        found = {k: _text(v) for k, v in zip(distinct, values, strict=True) if v is not None}
        return [[found.get(k) for k in ks] for ks in keys]

    def echo_hits(self, bands: Sequence[Sequence[str]]) -> list[str | None]:
        """Per document (its echo band keys), the indexed completion it shares a band with, or None."""
        return [next((h for h in hits if h is not None), None) for hits in self.echo_lookup(bands)]

    def echo_entries(self, completions: Sequence[str]) -> dict[str, list[str]]:
        """The keys indexed per completion (band keys, then sampled shingle keys); an evicted one is left out."""
        if not completions:
            return {}
        raw = self.r.hmget(self.k_echo_bands, list(completions))
        return {c: _text(v).split(",") for c, v in zip(completions, raw, strict=True) if v is not None}

    def echo_add(self, completions: Sequence[tuple[str, Sequence[str]]], max_echo: int) -> int:
        """Index completions (content key, echo band keys) outside ingest; returns how many were new."""
        args: list[Any] = [int(max_echo)]
        for key, bands in completions:
            args += [key, ",".join(bands)]
        return int(self._echo_add(keys=[self.k_echo_lsh, self.k_echo, self.k_echo_bands, self.k_stats], args=args))

    def provenance_counts(self) -> dict[str, int]:
        """Accepted documents per provenance class, and the size of the echo index."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k_provenance)
        pipe.zcard(self.k_echo)
        raw, echoes = pipe.execute()
        return {**{_text(k): int(v) for k, v in raw.items()}, "echo_index": int(echoes)}

    def passes(self, keys: Sequence[str]) -> list[int]:
        return [int(v or 0) for v in self.r.hmget(self.k_passes, list(keys))] if keys else []

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        out = {}
        for k, v in self.r.hgetall(self.k_offsets).items():
            topic, _, part = _text(k).rpartition("|")
            out[(topic, int(part))] = int(v)
        return out

    def guard_state(self) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], dict[str, Any]]]:
        """Stored offsets and in-flight markers, read together (the crash-loop guard compares them)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k_offsets)
        pipe.hgetall(self.k_inflight)
        offs, marks = pipe.execute()
        split = lambda k: (_text(k).rpartition("|")[0], int(_text(k).rpartition("|")[2]))  # noqa: E731
        return {split(k): int(v) for k, v in offs.items()}, {split(k): json.loads(v) for k, v in marks.items()}

    def set_inflight(self, markers: dict[tuple[str, int], dict[str, Any]]) -> None:
        """Record, before a batch is processed, which offsets of each partition are in flight and by whom."""
        if markers:
            self.r.hset(
                self.k_inflight, mapping={partition_key(t, p): json.dumps(m, separators=(",", ":")) for (t, p), m in markers.items()}
            )

    def counters(self) -> dict[tuple[str, str], int]:
        out = {}
        for k, v in self.r.hgetall(self.k_counters).items():
            outcome, _, reason = _text(k).partition("|")
            out[(outcome, reason)] = int(v)
        return out

    def buffer_stats(self) -> dict[str, int]:
        raw = self.r.hgetall(self.k_stats)
        s = {_text(k): int(v) for k, v in raw.items()}
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
        members = cast("list[bytes | str]", self.r.zrange(self.k_buffer, 0, end))  # without scores: members only
        return [_text(k) for k in members]

    def get_docs(self, keys: Iterable[str]) -> list[StoredDoc]:
        """The records that exist, in the order of `keys` (a record gone is left out)."""
        return [d for d in self.get_docs_by_key(list(keys)) if d is not None]

    def get_docs_by_key(self, keys: Sequence[str], chunk: int = 1000) -> list[StoredDoc | None]:
        """Records in the order of `keys`, None where a record is gone; read `chunk` keys per call."""
        out: list[StoredDoc | None] = []
        for i in range(0, len(keys), chunk):
            part = list(keys[i : i + chunk])
            out += [_doc(k, v) if v is not None else None for k, v in zip(part, self.r.hmget(self.k_docs, part), strict=True)]
        return out

    def remove_docs(self, keys: Sequence[str]) -> int:
        """Drop documents from the buffer, and from the store with their near-dedup bands unless the replay
        reservoir holds them (their exact key stays remembered either way)."""
        if not keys:
            return 0
        return int(self._remove(keys=[self.k_docs, self.k_buffer, self.k_lsh, self.k_stats, self.k_replay_members], args=list(keys)))

    # --- replay reservoir ---------------------------------------------------
    def replay_offer(
        self, docs: Sequence[StoredDoc], cap: int, draw: Callable[[], float], slot_of: Callable[[int, int, float], int | None]
    ) -> int:
        """Offer documents (with their key and bands) to the reservoir; returns how many were placed.

        `slot_of(seen, cap, u)` is the sampling decision (policies.replay.reservoir_slot) and `draw()` its
        uniform draw; documents already in the reservoir are not offered twice.
        """
        fresh: dict[str, StoredDoc] = {}
        for d in docs:
            fresh.setdefault(d.key, d)
        keys = list(fresh)
        if keys:
            member = self.r.smismember(self.k_replay_members, keys)
            keys = [k for k, m in zip(keys, member, strict=True) if not m]
        while True:
            seen0 = int(self.r.hget(self.k_stats, "replay_seen") or 0)
            seen = seen0
            args: list[int | str] = []  # (slot, key, blob) triples
            for k in keys:
                slot = slot_of(seen, cap, draw())
                seen += 1
                if slot is not None:
                    args += [slot, k, fresh[k].record()]
            keys6 = [self.k_docs, self.k_buffer, self.k_lsh, self.k_stats, self.k_replay, self.k_replay_members]
            placed = int(self._replay_place(keys=keys6, args=[seen0, seen, *args]))
            if placed >= 0:
                return placed

    def replay_stats(self) -> dict[str, int]:
        return {"replay_docs": self.r.hlen(self.k_replay), "replay_seen": int(self.r.hget(self.k_stats, "replay_seen") or 0)}

    def replay_keys(self) -> list[str]:
        return [_text(k) for k in self.r.hvals(self.k_replay)]

    # --- lease (one round runner per deployment) ------------------------------
    def lease_acquire(self, owner: str, ttl_s: float) -> Fence | None:
        """Take or renew the lease; None while another owner holds it."""
        epoch = int(self._lease_acquire(keys=[self.k_lease, self.k_epoch], args=[owner, max(1, int(ttl_s * 1000))]))
        return Fence(owner, epoch) if epoch else None

    def lease_release(self, fence: Fence) -> None:
        """Hand the lease back at shutdown so another daemon takes over at once instead of after the TTL."""
        self._lease_release(keys=[self.k_lease], args=[fence.owner])

    def lease_holder(self) -> tuple[str | None, int]:
        holder, epoch = self.r.mget(self.k_lease, self.k_epoch)
        return (_text(holder) if holder else None), int(epoch or 0)

    def _fenced(self, script: Script, fence: Fence, keys: list[str], args: list[Any]) -> Any:
        try:
            return script(keys=[self.k_lease, self.k_epoch, *keys], args=[fence.owner, fence.epoch, *args])
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                raise Fenced(str(e).split("FENCED ", 1)[-1]) from None
            raise

    # --- rounds -----------------------------------------------------------------
    def next_round_number(self, above: int = 0) -> int:
        """The next round number: above both the last one Redis handed out and `above` (the highest round directory
        on the checkpoint volume), so a Redis that lost `round_seq` never hands out an id a directory already has."""
        return int(self._next_round(keys=[self.k_round_seq], args=[int(above)]))

    def round_seq(self) -> int:
        """The last round number handed out (0: none, or Redis lost it)."""
        return int(self.r.get(self.k_round_seq) or 0)

    def set_round_seq(self, n: int) -> None:
        """Set the last round number (the operator's `cptd accept-redis-reset`, while rounds are refused)."""
        self.r.set(self.k_round_seq, int(n))

    def identity(self) -> str | None:
        """The identity JSON of this deployment's Redis history, None when Redis has none."""
        v = self.r.get(self.k_identity)
        return _text(v) if v else None

    def set_identity(self, blob: str, replace: bool = False) -> str:
        """Write the identity (only where none exists unless `replace`); returns the identity Redis holds after."""
        self.r.set(self.k_identity, blob, nx=not replace)
        return self.identity() or blob

    def restore_serving(self, serving: str) -> bool:
        """Put a saved ServingState back where Redis has none (the operator's `cptd accept-redis-reset`); never
        overwrites one a lease holder wrote. True if written."""
        return bool(self.r.set(self.k_serving, serving, nx=True))

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
        return _text(v) if v else None

    def get_round(self, round_id: str) -> dict[str, Any] | None:
        v = self.r.hget(self.k_rounds, round_id)
        return json.loads(v) if v else None

    def round_ids(self) -> list[str]:
        """Ids of the records Redis holds, oldest first: HKEYS reads ids only, and retention bounds the hash."""
        return sorted((_text(k) for k in self.r.hkeys(self.k_rounds)), key=round_number)

    def get_rounds(self, round_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Records in the order of `round_ids`, None where Redis has none."""
        if not round_ids:
            return []
        return [json.loads(v) if v else None for v in self.r.hmget(self.k_rounds, list(round_ids))]

    def list_rounds(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest `limit` records (every one Redis holds when None), oldest first; only those are read."""
        ids = self.round_ids()
        ids = ids if limit is None else ids[max(len(ids) - limit, 0) :]
        return [r for r in self.get_rounds(ids) if r is not None]

    def delete_rounds(self, fence: Fence, round_ids: Sequence[str]) -> None:
        """Drop records from Redis (retention, after they were archived); the lease holder's write like any other."""
        if round_ids:
            self._fenced(self._put_round, fence, [self.k_rounds], ["", ""])  # fencing check only
            self.r.hdel(self.k_rounds, *round_ids)

    def round_list_key(self, round_id: str) -> str:
        return f"{self._prefix}round:{round_id}:docs"

    def snapshot_take(
        self, fence: Fence, round_id: str, budget_bytes: int, max_docs: int = 10_000_000, chosen: Sequence[str] = ()
    ) -> list[str]:
        """Move the oldest buffered documents up to the budget into the round, or exactly `chosen` (those still
        buffered) when given; a round that already has its list gets it back unchanged."""
        keys = [self.k_docs, self.k_buffer, self.k_stats, self.round_list_key(round_id)]
        args = [int(budget_bytes), int(max_docs), *chosen]
        return [_text(k) for k in self._fenced(self._snapshot, fence, keys, args)]

    def oldest_buffered(self, budget_bytes: int, batch: int = 1000) -> list[StoredDoc]:
        """Records of the oldest buffered documents, up to `budget_bytes` (at least one): a round's candidate pool."""
        out: list[StoredDoc] = []
        used, start = 0, 0
        while used < budget_bytes:
            keys = [_text(k) for k in cast("list[bytes | str]", self.r.zrange(self.k_buffer, start, start + batch - 1))]
            if not keys:
                break
            for d in self.get_docs_by_key(keys):
                if d is None:
                    continue
                if out and used + d.bytes > budget_bytes:
                    return out
                out.append(d)
                used += d.bytes
            start += batch
        return out

    def mark_passed_over(self, waiting: Sequence[str], done: Sequence[str]) -> None:
        """Count one more pass for documents a curated round left waiting; forget the count of those it took or dropped."""
        pipe = self.r.pipeline(transaction=False)
        for k in waiting:
            pipe.hincrby(self.k_passes, k, 1)
        if done:
            pipe.hdel(self.k_passes, *done)
        pipe.execute()

    def round_docs(self, round_id: str) -> list[str]:
        return [_text(k) for k in self.r.lrange(self.round_list_key(round_id), 0, -1)]

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
        return self._take_all(self.k_requests)

    def add_control(self, request_id: str, request: dict[str, Any]) -> None:
        self.r.hset(self.k_control, request_id, json.dumps(request))

    def take_control(self) -> dict[str, dict[str, Any]]:
        return self._take_all(self.k_control)

    def _take_all(self, key: str) -> dict[str, dict[str, Any]]:
        """Every request in the hash, removed in the same transaction: each is taken by one lease holder only."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.delete(key)
        raw, _ = pipe.execute()
        return {_text(k): json.loads(v) for k, v in raw.items()}

    def set_request_result(self, request_id: str, result: dict[str, Any], ttl_s: int = REQUEST_RESULT_TTL_S) -> None:
        """One key per request, with an expiry: the API waits seconds for it, so it never needs to outlive a day."""
        self.r.set(self._prefix + f"request_result:{request_id}", json.dumps(result), ex=ttl_s)

    def request_result(self, request_id: str) -> dict[str, Any] | None:
        v = self.r.get(self._prefix + f"request_result:{request_id}")
        return json.loads(v) if v else None

    def wait_request_result(self, request_id: str, wait_s: float, poll_s: float = 0.1) -> dict[str, Any] | None:
        """The answer the lease holder wrote for a queued request, polled for up to `wait_s`; None when none came."""
        deadline = time.monotonic() + wait_s
        while (res := self.request_result(request_id)) is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        return res

    def set_ingest_pause(self, by: str | None, at: float = 0.0) -> None:
        """The operator's ingest pause for every daemon (`by` names who asked); None lifts it."""
        if by is None:
            self.r.delete(self.k_ingest_pause)
        else:
            self.r.set(self.k_ingest_pause, json.dumps({"by": by, "at": at}))

    def ingest_pause(self) -> dict[str, Any] | None:
        v = self.r.get(self.k_ingest_pause)
        return json.loads(v) if v else None

    def ingest_paused(self) -> bool:
        return bool(self.r.exists(self.k_ingest_pause))

    def request_cancel(self, round_id: str) -> None:
        self.r.sadd(self.k_cancel, round_id)

    def cancel_requested(self, round_id: str) -> bool:
        return bool(self.r.sismember(self.k_cancel, round_id))

    def cancel_marks(self) -> list[str]:
        return sorted(_text(m) for m in cast("set[bytes | str]", self.r.smembers(self.k_cancel)))

    def clear_cancel(self, round_ids: Sequence[str]) -> None:
        """Forget the marks of rounds that ended: a mark only matters while its round runs."""
        if round_ids:
            self.r.srem(self.k_cancel, *round_ids)

    def add_tracking_pending(self, round_id: str) -> None:
        """An ended round still to export to the experiment tracker (daemon/round_tracking.py)."""
        self.r.sadd(self.k_tracking, round_id)

    def tracking_pending(self) -> list[str]:
        return sorted(_text(m) for m in cast("set[bytes | str]", self.r.smembers(self.k_tracking)))

    def clear_tracking_pending(self, round_id: str) -> None:
        self.r.srem(self.k_tracking, round_id)

    def decide_approval(self, round_id: str, decision: dict[str, Any]) -> dict[str, Any] | None:
        """Keep an operator's decision on a waiting round; the first one stands (HSETNX). Returns the decision already
        kept when there is one (this one is then dropped), None when this one was kept."""
        if self.r.hsetnx(self.k_approvals, round_id, json.dumps(decision)):
            return None
        return self.approval_decision(round_id)

    def approval_decision(self, round_id: str) -> dict[str, Any] | None:
        v = self.r.hget(self.k_approvals, round_id)
        return json.loads(v) if v else None

    def approval_marks(self) -> list[str]:
        return sorted(_text(k) for k in cast("list[bytes | str]", self.r.hkeys(self.k_approvals)))

    def clear_approvals(self, round_ids: Sequence[str]) -> None:
        """Forget the decisions on rounds that ended (a decision only matters while its round waits)."""
        if round_ids:
            self.r.hdel(self.k_approvals, *round_ids)

    def ping(self) -> bool:
        return bool(self.r.ping())

    def memory_info(self) -> dict[str, int | str]:
        """INFO memory's used_memory, maxmemory (0 = none) and maxmemory_policy: how close Redis is to refusing writes."""
        info = self.r.info("memory")
        return {
            "used_memory": int(info["used_memory"]),
            "maxmemory": int(info["maxmemory"]),
            "maxmemory_policy": str(info["maxmemory_policy"]),
        }
