"""The round state machine (docs/architecture.md §3), persisted in Redis, resumable, run by one lease holder.

    PENDING -> SNAPSHOT -> TRAINING -> EVALUATING -> DEPLOYING -> DEPLOYED
    exits: REJECTED (the gate said no), FAILED (error, with cause), ROLLED_BACK

A round's record is written before each phase starts, and each phase is
idempotent, so a daemon killed anywhere resumes the round from its persisted
phase: SNAPSHOT's document move is one Lua call that returns the same list when
repeated, the trainer resumes from its newest checkpoint, an evaluation is
rerun, and a deploy first reconciles what the replicas really serve. Every
write checks the lease's fencing token in the same Redis call, so a daemon that
lost the lease cannot overwrite the new holder's state.

Where documents go: SNAPSHOT moves them from the buffer into the round. After
training was used (DEPLOYED, REJECTED, ROLLED_BACK) they are offered to the
replay reservoir and leave the buffer for good; a round that FAILED gives them
back to the front of the buffer, so the next round trains them.

The round keeps a copy of the policy it started under: a reload during a round
changes the next round, never the running one (so a resumed round is the same round).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import fields as dataclass_fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from connectors.redis_store import Fence, Fenced, RedisStore
from connectors.vllm import ServingConfig, ServingError
from daemon import failpoints
from daemon import metrics as M
from daemon.jobs.specs import DetectorSpec, DriftSpec, EvalReport, EvalSpec, TrainSpec
from daemon.round_record import (
    PHASES,
    TERMINAL,
    CandidateScores,
    CurationRecord,
    DeploySummary,
    DeployWait,
    DocsFate,
    DriftRecord,
    EvalProgress,
    EvalSummary,
    GateRecord,
    LanguageMixRecord,
    ModelLosses,
    OffsetRange,
    Parent,
    PhaseTimes,
    RollbackRecord,
    RollbackResult,
    RoundRecord,
    RoundState,
    Snapshot,
    TrainRecord,
    Trigger,
    WatchRecord,
)
from daemon.serving import ServingController, ServingState
from daemon.settings import Settings
from policies.collapse import suspected
from policies.config import Policy, policy_hash
from policies.curation import Candidate, select_round, shares_by
from policies.drift import DriftStats, adjust_for_drift, apply_to_schedule, drift_score
from policies.gates import GateDecision, gate_round
from policies.language_mix import draw_by_language, replay_shares, shares
from policies.replay import reservoir_slot
from policies.round_policy import blackout_match, estimate_tokens, next_swap_allowed, prune_rounds, should_start, split_heldout

log = logging.getLogger("cptd.rounds")

BASE_VERSION = "base"


class Stop(Exception):
    """The daemon is stopping (SIGTERM) or lost the lease: leave the round where it is, resumable."""


class RoundFailed(Exception):
    def __init__(self, cause: str, requeue: bool = True):
        super().__init__(cause)
        self.cause, self.requeue = cause, requeue


def _pdeathsig() -> None:
    """Child processes die with the daemon (Linux), so a restarted daemon never races a leftover trainer."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _write_atomic(path: Path, blob: bytes) -> None:
    """tmp file + rename: a reader (or a resumed round) sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    _write_atomic(path, json.dumps(obj, ensure_ascii=False).encode())


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    """Atomic write; returns the sha256 of the content (the manifest hash of the lineage)."""
    blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    _write_atomic(path, blob)
    return hashlib.sha256(blob).hexdigest()


class RoundRunner:
    def __init__(self, store: RedisStore, settings: Settings, get_policy: Callable[[], Policy], owner: str | None = None):
        self.store, self.settings, self.get_policy = store, settings, get_policy
        self.owner = owner or settings.pod_name or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fence: Fence | None = None
        self.serving: ServingController | None = None
        self.serving_lock = threading.Lock()  # one deploy or rollback at a time
        self.wake = threading.Event()
        self.auto: tuple[str, str] | None = None  # latest automatic trigger not acted on yet
        self.child: subprocess.Popen | None = None
        self.active: str | None = None
        self._taken_over_epoch = 0
        self._stop = threading.Event()
        urls = settings.replica_urls()
        self.disabled = None if urls else "no vLLM replicas configured (CPTD_VLLM_URLS or CPTD_VLLM_CONTROL_URL)"
        self.urls = urls

    # ------------------------------------------------------------------ lease
    def leader(self) -> bool:
        return self.fence is not None

    def _lease_loop(self, stop: threading.Event) -> None:
        last_ok = 0.0
        while not stop.is_set():
            ttl = self.get_policy().rounds.lease_ttl_s
            try:
                f = self.store.lease_acquire(self.owner, ttl)
                last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - Redis down: we keep the lease only until it would have expired
                log.warning("lease renewal failed", extra={"error": str(e)})
                f = self.fence if time.monotonic() - last_ok < ttl * 0.8 else None
            if f is not None and (self.fence is None or f.epoch != self.fence.epoch):
                log.info("took the round lease", extra={"owner": self.owner, "epoch": f.epoch})
                self.fence = f
                self.wake.set()
            elif f is None and self.fence is not None:
                log.warning("lost the round lease", extra={"owner": self.owner})
                M.LEASE_LOST.inc()
                self.fence = None
                self._kill_child()
            M.LEADER.set(1 if self.fence else 0)
            stop.wait(ttl / 3)
        if self.fence is not None:  # hand over at once rather than after the TTL
            try:
                self.store.lease_release(self.fence)
            except Exception:  # noqa: BLE001
                pass
            self.fence = None
            M.LEADER.set(0)

    def _fence(self) -> Fence:
        f = self.fence
        if f is None:
            raise Stop("lease lost")
        return f

    # ------------------------------------------------------------------ requests
    def request(self, kind: str, detail: str) -> None:
        """Automatic triggers (scheduler jobs) land here; only the lease holder acts on them."""
        if self.leader():
            self.auto = (kind, detail)
            self.wake.set()

    def request_manual(self, reason: str = "operator") -> str:
        rid = uuid.uuid4().hex[:12]
        self.store.add_request(rid, {"kind": "manual", "detail": reason, "at": time.time()})
        self.wake.set()
        return rid

    def buffer_tokens(self) -> int:
        """Estimated tokens waiting (the buffer trigger and should_start read the same figure)."""
        return estimate_tokens(self.store.buffer_stats()["buffer_bytes"], self.get_policy().rounds)

    def _next_round(self) -> str | None:
        """Act on waiting requests: start a round for the first one that may start, answer the rest."""
        policy = self.get_policy()
        manual = self.store.take_requests()
        auto, self.auto = self.auto, None
        asks = [(rid, r["kind"], r.get("detail", "")) for rid, r in sorted(manual.items(), key=lambda kv: kv[1].get("at", 0))]
        if auto:
            asks.append((None, *auto))
        started: str | None = None
        if asks:  # read once: nothing changes them until a round starts, and then the rest are merged
            last_start = max((r.created_at for r in self.list_rounds()), default=None)
            tokens = self.buffer_tokens()
        for req_id, kind, _detail in asks:
            if started:
                if req_id:
                    self.store.set_request_result(req_id, {"round": started, "note": "merged into the round just started"})
                continue
            chk = should_start(kind, time.time(), last_start, False, tokens, policy.rounds, policy.triggers)
            if not chk.start:
                if req_id:
                    self.store.set_request_result(req_id, {"round": None, "refused": chk.reason})
                log.info("trigger not acted on", extra={"trigger": kind, "reason": chk.reason})
                continue
            started = self._create(policy, kind, chk.reason, req_id)
            if req_id:
                self.store.set_request_result(req_id, {"round": started})
        return started

    def _create(self, policy: Policy, kind: str, reason: str, req_id: str | None) -> str:
        n = self.store.next_round_number()
        rid = f"r{n:05d}"
        st = self.serving.state if self.serving else ServingState()
        live = st.desired_version
        now = time.time()
        rec = RoundRecord(
            id=rid,
            number=n,
            state=RoundState.PENDING,
            created_at=now,
            updated_at=now,
            trigger=Trigger(kind=kind, reason=reason, request_id=req_id),
            owner=self.owner,
            policy_hash=policy_hash(policy),
            policy=policy.model_dump(mode="json"),
            parent=Parent(
                version=live,
                checkpoint=st.versions[live].checkpoint if live in st.versions else None,
                adapter=st.lora_active,
                adapter_path=st.lora_paths.get(st.lora_active) if st.lora_active else None,
            ),
            phases={RoundState.PENDING: PhaseTimes(started_at=now)},
        )
        self._put(rec)
        log.info("round created", extra={"round_id": rid, "trigger": kind, "reason": reason})
        return rid

    # ------------------------------------------------------------------ persistence
    def _put(self, rec: RoundRecord) -> None:
        rec.updated_at = time.time()
        self.store.put_round(self._fence(), rec.id, rec.to_store())

    def get_round(self, rid: str) -> RoundRecord | None:
        raw = self.store.get_round(rid)
        return RoundRecord.model_validate(raw) if raw is not None else None

    def list_rounds(self) -> list[RoundRecord]:
        """Every round record, oldest first."""
        return [RoundRecord.model_validate(r) for r in self.store.list_rounds()]

    def _enter(self, rec: RoundRecord, state: RoundState) -> None:
        now = time.time()
        prev = rec.phases.get(rec.state)
        if prev is not None and prev.finished_at is None:
            prev.finished_at = now
            M.ROUND_PHASE_SECONDS.labels(phase=rec.state.value).observe(now - prev.started_at)
        rec.state = state
        rec.phases.setdefault(state, PhaseTimes(started_at=now))
        self._put(rec)
        for p in PHASES:
            M.ROUND_PHASE.labels(phase=p.value).set(1 if p == state else 0)
        if state in TERMINAL:
            M.ROUNDS.labels(state=state.value).inc()
        log.info("round phase", extra={"round_id": rec.id, "state": state.value})

    def _save_serving(self, state: ServingState) -> None:
        for rs in state.replicas.values():
            if rs.status == "swapping" and rs.step:
                failpoints.hit(f"deploy.{rs.step}")
        self.store.put_serving(self._fence(), state.to_json())

    # ------------------------------------------------------------------ taking over
    def _take_over(self) -> str | None:
        """New lease holder: learn what the replicas serve (a predecessor may have died mid-swap).

        Returns the round a predecessor left unfinished, if any: only a lease holder creates rounds,
        so after this the runner knows every unfinished round without reading the round list again."""
        unfinished = next((r for r in self.list_rounds() if r.state not in TERMINAL), None)
        raw = self.store.get_serving()
        state = ServingState.from_json(raw) if raw else ServingState()
        if self.serving is not None:
            self.serving.close()
        cfg = ServingConfig(
            api_key=self.settings.vllm_api_key.get_secret_value() if self.settings.vllm_api_key else None,
            ca_file=str(self.settings.vllm_ca_file) if self.settings.vllm_ca_file else None,
        )
        self.serving = ServingController(self.urls, state, on_state=self._save_serving, config=cfg)
        if state.desired_version is None:
            base = str(self.settings.base_checkpoint_path().resolve())
            self.serving.adopt(base, BASE_VERSION)
            log.info("adopted the serving model", extra={"checkpoint": base, "version": BASE_VERSION})
        else:
            rec = self.serving.reconcile()
            log.info("reconciled serving state", extra={"live": rec.live, "diverged": rec.diverged, "errors": rec.errors})
            deploying = unfinished is not None and unfinished.state == RoundState.DEPLOYING  # its resumed deploy converges them
            if rec.diverged and not deploying and not rec.errors:
                out = self.serving.rollback("reconcile", to_version=state.desired_version)
                log.info("brought diverged replicas back to the deployed version", extra={"version": state.desired_version, "ok": out.ok})
        return unfinished.id if unfinished else None

    # ------------------------------------------------------------------ main loop
    def run(self, stop: threading.Event) -> None:
        if self.disabled:
            log.warning("rounds disabled", extra={"reason": self.disabled})
            return
        self._stop = stop
        threading.Thread(target=self._lease_loop, args=(stop,), name="lease", daemon=True).start()
        resume: str | None = None  # a round to (re)drive: left by a predecessor, or interrupted by an error here
        while not stop.is_set():
            f = self.fence
            if f is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                if self._taken_over_epoch != f.epoch:
                    resume = self._take_over()
                    self._taken_over_epoch = f.epoch
                resume = resume or self._next_round()
                if resume is None:
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                self.drive(resume, stop)
                resume = None
            except (Stop, Fenced) as e:
                log.warning("round runner paused", extra={"reason": str(e)})
            except Exception as e:  # noqa: BLE001 - the loop must survive Redis/vLLM outages; it retries
                log.exception("round runner error", extra={"error": repr(e)})
                stop.wait(5.0)
        self._kill_child()

    def drive(self, rid: str, stop: threading.Event) -> RoundRecord:
        rec = self.get_round(rid)
        if rec is None:
            raise KeyError(rid)
        self.active = rid
        steps = {
            RoundState.PENDING: self._pending,
            RoundState.SNAPSHOT: self._snapshot,
            RoundState.TRAINING: self._training,
            RoundState.EVALUATING: self._evaluating,
            RoundState.DEPLOYING: self._deploying,
        }
        try:
            while rec.state not in TERMINAL:
                if stop.is_set():
                    raise Stop("stopping")
                if self.store.cancel_requested(rid) and rec.state != RoundState.DEPLOYING:
                    raise RoundFailed("cancelled by operator", requeue=True)
                try:
                    steps[rec.state](rec, stop)
                except (Stop, Fenced, RoundFailed):
                    raise
                except ServingError as e:
                    raise RoundFailed(f"{rec.state.value}: {e}") from e
                except Exception as e:  # noqa: BLE001 - any error ends the round with its cause, never the daemon
                    log.exception("round phase failed", extra={"round_id": rid, "state": rec.state.value})
                    raise RoundFailed(f"{rec.state.value}: {type(e).__name__}: {e}") from e
        except RoundFailed as e:
            rec.error = e.cause
            rec.docs = self._requeue(rec) if e.requeue else self._release(rec)
            self._enter(rec, RoundState.FAILED)
        finally:
            self.active = None
            self._kill_child()
        return rec

    # ------------------------------------------------------------------ paths
    def round_dir(self, rid: str) -> Path:
        return self.settings.checkpoint_dir / "rounds" / rid

    def _policy(self, rec: RoundRecord) -> Policy:
        return Policy.model_validate(rec.policy)

    # ------------------------------------------------------------------ phases
    def _pending(self, rec: RoundRecord, stop: threading.Event) -> None:
        refusal = self._refusal(self._policy(rec), rec)
        if refusal:
            raise RoundFailed(f"PENDING: refused before taking any document: {refusal}", requeue=True)
        self._enter(rec, RoundState.SNAPSHOT)

    def _refusal(self, pol: Policy, rec: RoundRecord) -> str | None:
        """What makes this round unable to deploy, found before it moves a document or trains a step."""
        if pol.train.mode == "full":
            return None
        assert self.serving is not None
        why = self.serving.lora_refusal(pol.train.lora_r)
        if why:
            return f"train.mode {pol.train.mode} needs every replica to take a rank-{pol.train.lora_r} adapter: {why}"
        if pol.train.mode == "qlora":
            cmd = [sys.executable, "-m", "daemon.jobs.model_loader", "check-4bit", pol.train.device]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=_pdeathsig)
            if r.returncode != 0:
                return f"train.mode qlora: the 4-bit check exited with {r.returncode}: {r.stderr.strip()[-300:]}"
            out = json.loads(r.stdout.strip().splitlines()[-1])
            if out["refusal"]:
                return f"train.mode qlora on {out['device']}: {out['refusal']}"
        return None

    def _snapshot(self, rec: RoundRecord, stop: threading.Event) -> None:
        pol = self._policy(rec)
        rid = rec.id
        budget = int(pol.rounds.budget_tokens * pol.rounds.bytes_per_token)
        data = self.round_dir(rid) / "data"
        data.mkdir(parents=True, exist_ok=True)
        chosen: list[str] = []
        pool: dict[str, dict[str, Any]] = {}  # the candidates' records, already read: not read again below
        if not self.store.round_docs(rid):  # a resumed SNAPSHOT whose documents already moved keeps its selection
            chosen, pool = self._curate(pol, rec, budget, data)
        keys = self.store.snapshot_take(self._fence(), rid, budget, chosen=chosen)
        failpoints.hit("snapshot.taken")
        if not keys:
            raise RoundFailed("SNAPSHOT: the buffer is empty", requeue=False)
        cur = self._curation_after_take(keys, data)
        docs = {d["key"]: d for d in self._docs_with_keys([k for k in keys if k not in pool])}
        docs.update((k, pool[k]) for k in keys if k in pool)
        missing = [k for k in keys if k not in docs]
        if missing:
            raise RoundFailed(f"SNAPSHOT: {len(missing)} document records missing from Redis (e.g. {missing[0]})")
        train_keys, held_keys = split_heldout(keys, pol.rounds.heldout_frac, pol.rounds.heldout_max_docs, rid)
        replay_all = sorted(self.store.replay_keys())
        replay_train, replay_held = (
            split_heldout(replay_all, 0.5, pol.rounds.replay_heldout_docs, rid + ":replay") if len(replay_all) >= 2 else (replay_all, [])
        )
        replay_docs = {d["key"]: d for d in self._docs_with_keys(replay_train + replay_held)}
        held = set(held_keys)
        scores = cur.get("scores", {})
        manifest = [
            {
                "key": k,
                "topic": docs[k].get("topic"),
                "partition": docs[k].get("partition"),
                "offset": docs[k].get("offset"),
                "id": docs[k].get("id"),
                "source": docs[k].get("source"),
                "domain": docs[k].get("domain"),
                "provenance": docs[k].get("provenance"),
                "heldout": k in held,
                **scores.get(k, {}),
            }
            for k in keys
        ]
        sha = _write_jsonl(data / "manifest.jsonl", manifest)
        _write_jsonl(data / "new.jsonl", [{"text": docs[k]["text"]} for k in train_keys])
        _write_jsonl(data / "heldout_new.jsonl", [{"text": docs[k]["text"]} for k in held_keys])
        _write_jsonl(data / "replay.jsonl", [{"text": replay_docs[k]["text"]} for k in replay_train if k in replay_docs])
        _write_jsonl(data / "heldout_replay.jsonl", [{"text": replay_docs[k]["text"]} for k in replay_held if k in replay_docs])
        offsets: dict[str, list[int]] = {}
        for m in manifest:
            if m["topic"] is not None:
                tp = f"{m['topic']}|{m['partition']}"
                lo, hi, n = offsets.get(tp, [m["offset"], m["offset"], 0])
                offsets[tp] = [min(lo, m["offset"]), max(hi, m["offset"]), n + 1]
        nbytes = sum(docs[k]["bytes"] for k in keys)
        stats = self._measure_drift(pol, data / "new.jsonl", data / "replay.jsonl", rec)
        decision = adjust_for_drift(stats, pol.drift, pol.replay)
        schedule = apply_to_schedule(pol.schedule, decision)
        rec.snapshot = Snapshot(
            docs=len(keys),
            train_docs=len(train_keys),
            heldout_docs=len(held_keys),
            bytes=nbytes,
            tokens_estimate=estimate_tokens(nbytes, pol.rounds),
            manifest=str(data / "manifest.jsonl"),
            manifest_sha256=sha,
            kafka_offsets={tp: OffsetRange(first=v[0], last=v[1], docs=v[2]) for tp, v in sorted(offsets.items())},
            replay_docs=len(replay_train),
            replay_heldout_docs=len(replay_held),
        )
        rec.drift = DriftRecord.model_validate(decision.to_record())
        rec.replay_ratio = decision.replay_ratio if replay_train else 0.0
        rec.language_mix = self._language_mix(pol, [docs[k] for k in train_keys], replay_train, replay_docs, rec.replay_ratio, data)
        rec.curation = self._curation_record(cur, pol, rec.replay_ratio)
        rec.schedule = schedule.model_dump(mode="json")
        if decision.score is not None:
            M.DRIFT_SCORE.labels(statistic="score").set(decision.score)
            M.DRIFT_SCORE.labels(statistic="ppl_gap").set(decision.stats.ppl_gap)
            M.DRIFT_SCORE.labels(statistic="js_distance").set(decision.stats.js_distance)
            if decision.stats.fertility_ratio is not None:
                M.DRIFT_SCORE.labels(statistic="fertility_ratio").set(decision.stats.fertility_ratio)
        M.REPLAY_RATIO.set(rec.replay_ratio)
        self._enter(rec, RoundState.TRAINING)

    def _language_mix(
        self, pol: Policy, new: list[dict[str, Any]], replay_keys: list[str], replay_docs: dict[str, Any], ratio: float, data: Path
    ) -> LanguageMixRecord:
        """Language shares of the round; with targets, the replay the trainer reads is redrawn towards them."""

        def sizes(docs: list[dict[str, Any]]) -> dict[str, float]:
            out: dict[str, float] = {}
            for d in docs:
                lang = d.get("language") or "unknown"
                out[lang] = out.get(lang, 0.0) + d["bytes"]
            return out

        pool = [replay_docs[k] for k in replay_keys if k in replay_docs]
        new_sizes = sizes(new)
        wanted = replay_shares(new_sizes, ratio, pol.language_mix.targets)
        drawn = draw_by_language(pool, wanted) if wanted else pool
        if wanted:
            _write_jsonl(data / "replay.jsonl", [{"text": d["text"]} for d in drawn])
        n, r = sum(new_sizes.values()), sum(d["bytes"] for d in drawn)
        mixture = {lang: (1 - ratio) * x for lang, x in shares(new_sizes).items()}
        for lang, x in shares(sizes(drawn)).items():
            mixture[lang] = mixture.get(lang, 0.0) + ratio * x
        return LanguageMixRecord(
            targets=dict(pol.language_mix.targets),
            new=shares(new_sizes),
            replay_available=shares(sizes(pool)),
            replay_wanted=wanted,
            replay=shares(sizes(drawn)),
            mixture=dict(sorted(mixture.items())) if n and r else shares(new_sizes),
            replay_docs=len(drawn),
        )

    # ------------------------------------------------------------------ curation (policies/curation.py)
    def _curate(self, pol: Policy, rec: RoundRecord, budget: int, data: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Score the candidate pool with the served model, select the round's documents, and write the decision
        to data/curation.json before any document moves (a resumed SNAPSHOT reads it back). Returns the chosen
        keys and the pool's records by key."""
        pool = self.store.oldest_buffered(int(budget * pol.curation.pool_factor))
        if not pool:
            return [], {}
        scores: dict[str, dict[str, Any]] = {}
        info: dict[str, Any] = {"pool_docs": len(pool)}
        if pol.curation.score == "perplexity":
            scores, info = self._score_pool(pol, pool, info)
        if pol.collapse.detector:
            for k, v in self._detector_scores(pol, rec, pool, data).items():
                scores.setdefault(k, {})["detector"] = v
        passes = self.store.passes([d["key"] for d in pool])
        cands = [
            Candidate(
                key=d["key"],
                bytes=d["bytes"],
                domain=d.get("domain") or "unknown",
                provenance=d.get("provenance") or "unknown",
                nll=scores.get(d["key"], {}).get("nll"),
                detector=scores.get(d["key"], {}).get("detector"),
                suspected=suspected(scores.get(d["key"], {}).get("detector"), pol.collapse),
                passes=p,
            )
            for d, p in zip(pool, passes, strict=True)
        ]
        sel = select_round(cands, budget, pol.curation, pol.collapse)
        if not sel.chosen:  # never fall back to taking the oldest documents the policy just refused
            why = dict(Counter(sel.waiting.values()))
            raise RoundFailed(f"SNAPSHOT: curation chose none of {len(pool)} candidates (waiting {why}, dropped {len(sel.dropped)})", False)
        for k, z in sel.z.items():
            scores.setdefault(k, {})["z"] = round(z, 4)
        for c in cands:
            if c.suspected:
                scores.setdefault(c.key, {})["suspected"] = True
        dropped = [
            {**_manifest_row(d), "reason": sel.dropped[d["key"]], **scores.get(d["key"], {}), "text": d["text"]}
            for d in pool
            if d["key"] in sel.dropped
        ]
        _write_jsonl(data / "dropped.jsonl", dropped)
        out = {
            **info,
            "chosen": sel.chosen,
            "waiting": sel.waiting,
            "passed": sel.passed,
            "dropped": sel.dropped,
            "median_nll": sel.median_nll,
            "mad_nll": sel.mad_nll,
            "cap_binding": sel.cap_binding,
            "scores": scores,
            "domains": shares_by(cands, sel.chosen, "domain"),
            "provenance": shares_by(cands, sel.chosen, "provenance"),
        }
        _write_json(data / "curation.json", out)
        log.info(
            "curated the round's documents",
            extra={"round_id": rec.id, "pool": len(pool), "chosen": len(sel.chosen), "dropped": len(sel.dropped)},
        )
        return sel.chosen, {d["key"]: d for d in pool}

    def _score_pool(
        self, pol: Policy, pool: list[dict[str, Any]], info: dict[str, Any]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Per-document mean NLL under the served model (route model: the active adapter, else the base), batched."""
        assert self.serving is not None
        client = self.serving.replicas[0]
        model = self.serving.route_model()
        try:
            if client.server_info().lora_enabled:
                # vLLM 0.32's engine dies on a prompt-logprobs request when started with --enable-lora (vllm#29955,
                # seen on the CPU build: tests/test_doc_scoring.py). Scoring would take the replica down: skip it, say why.
                why = f"replica {client.url} runs with --enable-lora, where prompt logprobs crash vLLM 0.32 (vllm#29955): scoring skipped"
                log.warning(why)
                return {}, {**info, "scoring_error": why}
        except ServingError as e:
            return {}, {**info, "scoring_error": str(e)[:500]}
        t0 = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        tokens = 0
        try:
            texts = [d["text"] for d in pool]
            res = client.prompt_logprobs(
                texts, model=model, max_tokens_per_doc=pol.curation.max_doc_tokens, batch_size=pol.curation.batch_docs
            )
        except ServingError as e:
            log.warning("scoring the candidate pool failed; the round goes on unscored", extra={"error": str(e)})
            return {}, {**info, "scoring_error": str(e)[:500]}
        for d, r in zip(pool, res, strict=True):
            if r.tokens > 0:
                out[d["key"]] = {"nll": round(r.nll, 5), "scored_tokens": r.tokens}
                tokens += r.tokens
        took = max(time.monotonic() - t0, 1e-9)
        M.SCORING_DOCS_PER_SECOND.set(len(out) / took)
        return out, {
            **info,
            "scored_docs": len(out),
            "scoring_seconds": round(took, 3),
            "scoring_docs_per_s": round(len(out) / took, 2),
            "scoring_tokens_per_s": round(tokens / took, 1),
        }

    def _detector_scores(self, pol: Policy, rec: RoundRecord, pool: list[dict[str, Any]], data: Path) -> dict[str, float]:
        """Binoculars scores of the pool (daemon/jobs/generated_text_detector.py), in a child on the trainer's device."""
        served = rec.parent.checkpoint
        if not served:
            return {}
        _write_jsonl(data / "pool.jsonl", [{"key": d["key"], "text": d["text"]} for d in pool])
        spec = DetectorSpec(
            served=served,
            reference=str(self.settings.base_checkpoint_path()),
            adapter=rec.parent.adapter_path,
            docs_path=str(data / "pool.jsonl"),
            out_path=str(data / "detector.jsonl"),
            max_len=pol.curation.max_doc_tokens,
            device=pol.train.device,
            dtype=self._served_dtype(),
        )
        cmd = [sys.executable, "-m", "daemon.jobs.generated_text_detector", str(spec.write(self.round_dir(rec.id) / "detector-spec.json"))]
        if self._child(cmd, self.round_dir(rec.id) / "detector.log", rec, timeout=3600) != 0:
            log.warning("the generated-text detector failed; see detector.log", extra={"round_id": rec.id})
            return {}
        rows = [json.loads(x) for x in (data / "detector.jsonl").read_text().splitlines() if x.strip()]
        return {r["key"]: r["score"] for r in rows if r.get("score") is not None}

    def _curation_after_take(self, keys: list[str], data: Path) -> dict[str, Any]:
        """Once the round holds its documents: drop the outliers from the buffer, count passes, export the counts."""
        path = data / "curation.json"
        if not path.exists():
            return {}
        cur = json.loads(path.read_text())
        if not cur.get("applied"):
            dropped = list(cur.get("dropped", {}))
            if dropped:
                self.store.remove_docs(dropped)
            taken = set(keys)
            self.store.mark_passed_over(cur.get("passed", []), [*dropped, *taken])
            for reason in cur.get("waiting", {}).values():
                M.CURATION_DOCS.labels("waiting", reason).inc()
            for reason in cur.get("dropped", {}).values():
                M.CURATION_DOCS.labels("dropped", reason).inc()
            M.CURATION_DOCS.labels("chosen", "").inc(len(keys))
            cur["applied"] = True
            _write_json(path, cur)
        return cur

    def _curation_record(self, cur: dict[str, Any], pol: Policy, replay_ratio: float | None) -> CurationRecord | None:
        if not cur:
            return None
        counts = lambda d: dict(sorted(Counter(d.values()).items()))  # noqa: E731 - reason -> documents
        syn = cur.get("provenance", {}).get("synthetic", 0.0)
        r = replay_ratio or 0.0
        previous = [x for x in self.list_rounds() if x.curation is not None and x.state in TERMINAL]
        before = previous[-1].curation.cap_binding_rounds if previous and previous[-1].curation else 0
        streak = before + 1 if cur.get("cap_binding") else 0
        rec = CurationRecord(
            pool_docs=cur.get("pool_docs", 0),
            scored_docs=cur.get("scored_docs", 0),
            scoring_seconds=cur.get("scoring_seconds"),
            scoring_docs_per_s=cur.get("scoring_docs_per_s"),
            scoring_tokens_per_s=cur.get("scoring_tokens_per_s"),
            scoring_error=cur.get("scoring_error"),
            median_nll=cur.get("median_nll"),
            mad_nll=cur.get("mad_nll"),
            chosen_docs=len(cur.get("chosen", [])),
            waiting=counts(cur.get("waiting", {})),
            dropped=counts(cur.get("dropped", {})),
            domain_targets=dict(pol.curation.domain_targets),
            domains=cur.get("domains", {}),
            provenance=cur.get("provenance", {}),
            synthetic_share=syn,
            synthetic_cap=pol.collapse.effective_cap,
            cap_binding=bool(cur.get("cap_binding")),
            cap_binding_rounds=streak,
            real_share=(1 - r) * (1 - syn) + r,  # replay admits real documents only (collapse.replay_admits)
            real_floor=pol.collapse.real_floor,
        )
        for cls, x in rec.provenance.items():
            M.ROUND_SHARE.labels("provenance", cls).set(x)
        for dom, x in rec.domains.items():
            M.ROUND_SHARE.labels("domain", dom).set(x)
        M.ROUND_SHARE.labels("real", "real").set(rec.real_share or 0.0)
        M.SYNTHETIC_CAP_BINDING_ROUNDS.set(streak)
        return rec

    def _docs_with_keys(self, keys: list[str]) -> list[dict[str, Any]]:
        out = []
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            for k, d in zip(chunk, self.store.get_docs_by_key(chunk), strict=False):
                if d is not None:
                    out.append({**d, "key": k})
        return out

    def _measure_drift(self, pol: Policy, new: Path, ref: Path, rec: RoundRecord) -> DriftStats | None:
        """Under the serving model, in a child process; no reference set or a failed probe = unmeasured."""
        parent = rec.parent.checkpoint
        if not parent or ref.stat().st_size == 0 or new.stat().st_size == 0:
            return None
        spec = DriftSpec(
            model=parent,
            new_path=str(new),
            ref_path=str(ref),
            max_docs=pol.drift.probe_docs,
            max_len=pol.drift.probe_max_len,
            seed=rec.number,
            device=pol.train.device,
            dtype=self._served_dtype(),
        )
        cmd = [sys.executable, "-m", "daemon.jobs.drift_probe", str(spec.write(self.round_dir(rec.id) / "drift-spec.json"))]
        out = self._child(cmd, self.round_dir(rec.id) / "drift.log", rec, timeout=1800)
        if out != 0:
            rec.drift_error = f"drift probe exited with {out}; see drift.log"
            return None
        line = (self.round_dir(rec.id) / "drift.log").read_text().strip().splitlines()[-1]
        d = json.loads(line)
        return _drift_stats(d)

    def _training(self, rec: RoundRecord, stop: threading.Event) -> None:
        pol = self._policy(rec)
        rid = rec.id
        rd = self.round_dir(rid)
        if rec.train is None:
            seed = int(hashlib.sha256(f"{pol.train.seed}:{rid}".encode()).hexdigest()[:8], 16)
            mainline = None
            if pol.schedule.kind == "infinite" and rec.parent.version not in (None, BASE_VERSION):
                prev = self.get_round(rec.parent.version)
                mainline = ((prev.train.result if prev and prev.train else None) or {}).get("mainline")
            parent = rec.parent.checkpoint  # lora/qlora: the base vLLM serves, which the adapter goes on
            if parent is None:
                raise RoundFailed("TRAINING: the serving version has no known checkpoint to train from")
            spec = TrainSpec(
                parent_dir=parent,
                out_dir=str(rd / "train"),
                new_path=str(rd / "data/new.jsonl"),
                replay_path=str(rd / "data/replay.jsonl"),
                heldout_new_path=str(rd / "data/heldout_new.jsonl"),
                heldout_replay_path=str(rd / "data/heldout_replay.jsonl"),
                replay_ratio=rec.replay_ratio or 0.0,
                schedule=rec.schedule or {},
                train=pol.train.model_dump(mode="json"),
                mainline_in=mainline,
                adapter_in=rec.parent.adapter_path if pol.train.mode != "full" else None,
                data_seed=seed,
                init_seed=seed + 1,
                round_id=rid,
                cpu_threads=self.settings.train_cpu_threads,
            )
            rec.train = TrainRecord(
                spec=json.loads(spec.to_json()), spec_digest=spec.digest(), out_dir=spec.out_dir, launcher=self.settings.train_launcher
            )
            self._put(rec)
        spec = TrainSpec(**rec.train.spec)
        spec_path = rd / "train-spec.json"
        spec_path.write_text(spec.to_json())
        launcher = self.settings.train_launcher
        if launcher in ("subprocess", "process"):
            cmd = [sys.executable, "-m", "daemon.jobs.trainer", str(spec_path)]
        elif launcher.startswith("torchrun:"):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={int(launcher.split(':', 1)[1])}",
                "-m",
                "daemon.jobs.trainer",
                str(spec_path),
            ]
        elif launcher == "kubernetes":
            cmd = []
        else:
            raise RoundFailed(
                f"TRAINING: launcher {launcher!r} is not supported by this version (use subprocess, torchrun:N or kubernetes)"
            )
        progress = Path(spec.out_dir) / "progress.jsonl"
        follower = _ProgressFollower(progress, rec, self)
        if launcher == "kubernetes":
            rc = self._kubernetes_training(rec, spec_path, follower)
        else:
            rc = self._child(cmd, rd / "train.log", rec, timeout=None, on_tick=follower.tick)
        follower.tick(final=True)
        result_file = Path(spec.out_dir) / "result.json"
        if rc != 0 or not result_file.exists():
            tail = "".join((rd / "train.log").read_text(errors="replace").splitlines(True)[-5:])[-800:]
            raise RoundFailed(f"TRAINING: trainer exited with code {rc}: {tail.strip()}")
        rec.train.result = json.loads(result_file.read_text())
        self._enter(rec, RoundState.EVALUATING)

    def _evaluating(self, rec: RoundRecord, stop: threading.Event) -> None:
        pol = self._policy(rec)
        rd = self.round_dir(rec.id)
        assert rec.train is not None and rec.train.result is not None and rec.parent.checkpoint is not None
        out = Path(rec.train.out_dir)
        steps = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
        last = rec.train.result["steps"]
        mids = (
            [p for p in steps if int(p.name.split("-")[1]) != last][-pol.rounds.eval_checkpoints :] if pol.rounds.eval_checkpoints else []
        )
        cands = [[p.name, str(p)] for p in mids] + [["final", str(out / "final")]]
        report_path = rd / "eval_report.json"
        adapters = pol.train.mode != "full"
        spec = EvalSpec(
            round_id=rec.id,
            # lora/qlora: what clients get now (the served base + the active adapter) vs each adapter on that base
            serving=(rec.parent.adapter_path or rec.parent.checkpoint) if adapters else rec.parent.checkpoint,
            base=rec.parent.checkpoint if adapters else None,
            device=pol.train.device,
            dtype=self._served_dtype(),
            candidates=cands,
            new_path=str(rd / "data/heldout_new.jsonl"),
            replay_path=str(rd / "data/heldout_replay.jsonl"),
            suites=dict(pol.rounds.suites),
            canaries=pol.rounds.canaries,
            max_len=pol.train.seq_len,
            out=str(report_path),
        )
        spec.write(rd / "eval-spec.json")
        if not report_path.exists():
            progress = spec.progress_path
            last_put = [0.0]

            def follow() -> None:
                lines = progress.read_text().splitlines() if progress.exists() else []
                if lines and time.monotonic() - last_put[0] > 2.0:
                    rec.eval_progress = EvalProgress.model_validate_json(lines[-1])
                    last_put[0] = time.monotonic()
                    self._put(rec)

            rc = self._child(
                [sys.executable, "-m", "daemon.jobs.evaluator", str(rd / "eval-spec.json")],
                rd / "eval.log",
                rec,
                timeout=None,
                on_tick=follow,
                hit="evaluating.child_started",
            )
            if rc != 0 or not report_path.exists():
                tail = (rd / "eval.log").read_text(errors="replace")[-800:]
                raise RoundFailed(f"EVALUATING: evaluation exited with code {rc}: {tail.strip()}")
        report = EvalReport.from_json(report_path.read_text())
        serving, candidates = report.gate_inputs()
        decision = gate_round(pol.gates, serving, candidates)
        record_eval_metrics(report, decision)
        rec.eval = EvalSummary(
            report=str(report_path),
            serving=ModelLosses(new_nll=report.serving.new.mean_nll, replay_nll=report.serving.replay.mean_nll),
            candidates=[
                CandidateScores(
                    name=c.name, new_nll=c.new.mean_nll, replay_nll=c.replay.mean_nll, suites={k: v.accuracy for k, v in c.suites.items()}
                )
                for c in report.candidates
            ],
        )
        rec.gate = GateRecord.model_validate(asdict(decision))
        if not decision.accepted:
            rec.docs = self._release(rec)
            self._enter(rec, RoundState.REJECTED)
            return
        rec.candidate = dict(cands)[decision.chosen]
        self._enter(rec, RoundState.DEPLOYING)

    def _deploying(self, rec: RoundRecord, stop: threading.Event) -> None:
        pol = self._policy(rec)
        rid = rec.id
        while (expr := blackout_match(datetime.now(timezone.utc), self.get_policy().triggers)) is not None:
            until = next_swap_allowed(datetime.now(timezone.utc), self.get_policy().triggers)
            if rec.deploy_wait is None or rec.deploy_wait.blackout != expr:
                rec.deploy_wait = DeployWait(blackout=expr, until=until.isoformat() if until else None)
                self._put(rec)
                log.info("deploy waits for a blackout window to end", extra={"round_id": rid, "blackout": expr})
            if self.store.cancel_requested(rid):
                raise RoundFailed("cancelled by operator while waiting for a blackout window", requeue=True)
            if stop.wait(5.0):
                raise Stop("stopping")
        assert self.serving is not None and rec.candidate is not None
        adapter = pol.train.mode != "full"  # lora/qlora: the adapter goes out under its own name; the base weights stay
        with self.serving_lock:
            st = self.serving.state
            if adapter:
                done = st.lora_active == self.serving.lora_name(rid)
            else:
                done = st.desired_version == rid and all(r.version == rid for r in st.replicas.values())
            if not done:
                d = (
                    self.serving.deploy_lora(rec.candidate, rid, max_rank=pol.train.lora_r)
                    if adapter
                    else self.serving.deploy(rec.candidate, rid)
                )
                rec.deploy = _deploy_summary(d.to_dict())
                if not d.ok:
                    e = d.error or {}
                    stays = f"clients stay on {self.serving.route_model()}" if adapter else f"serving stays on {st.desired_version}"
                    raise RoundFailed(
                        f"DEPLOYING: replica {e.get('replica') or '-'} step {e.get('step')}: {e.get('message')}; {stays}", requeue=True
                    )
            if pol.rounds.watch_s > 0 and rec.watch is None:
                w = self.serving.watch(pol.rounds.watch_s, rollback=not adapter)  # an adapter round's undo is rollback_lora
                rec.watch = WatchRecord(window_s=w.window_s, probes=len(w.probes), regression=w.regression)
                if w.regression:
                    back = self.serving.rollback_lora(trigger="watch") if adapter else w.rollback
                    to = (back.route_model if adapter else back.version) if back else None
                    rec.rollback = RollbackRecord(at=time.time(), trigger="watch", reason=w.regression, to=to, ok=bool(back and back.ok))
                    rec.docs = self._release(rec)
                    self._enter(rec, RoundState.ROLLED_BACK)
                    return
        rec.deployed_at = time.time()
        rec.docs = self._release(rec)
        M.ROUND_LAST_SUCCESS.set(rec.deployed_at)
        log.info("round deployed", extra={"round_id": rid, "route_model": rec.deploy.route_model if rec.deploy else None})
        self._enter(rec, RoundState.DEPLOYED)
        self._prune(pol)

    # ------------------------------------------------------------------ documents
    def _requeue(self, rec: RoundRecord) -> DocsFate:
        n = self.store.requeue_round(self._fence(), rec.id)
        return DocsFate(fate="requeued", docs=n)

    def _release(self, rec: RoundRecord) -> DocsFate:
        """Trained documents become replay candidates (Algorithm R under the cap) and leave the buffer."""
        pol = self._policy(rec)
        keys = self.store.round_docs(rec.id)
        docs = self._replay_admitted(rec, pol, self._docs_with_keys(keys))
        rng = random.Random(f"{rec.id}:replay")
        placed = self.store.replay_offer(docs, pol.replay.reservoir_docs, rng.random, reservoir_slot) if docs else 0
        self.store.remove_docs(keys)
        self.store.drop_round_list(self._fence(), rec.id)
        return DocsFate(fate="released", docs=len(keys), replay_placed=placed)

    def _replay_admitted(self, rec: RoundRecord, pol: Policy, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The documents the reservoir may take: provenance in collapse.replay_admits, not flagged by the detector."""
        path = self.round_dir(rec.id) / "data" / "curation.json"
        scores = json.loads(path.read_text()).get("scores", {}) if path.exists() else {}
        admits = set(pol.collapse.replay_admits)
        return [d for d in docs if (d.get("provenance") or "unknown") in admits and not scores.get(d["key"], {}).get("suspected")]

    # ------------------------------------------------------------------ retention
    def _prune(self, pol: Policy) -> None:
        """Delete old round directories; never the live one, its rollback target, or an unfinished round."""
        assert self.serving is not None
        st = self.serving.state
        rounds = self.list_rounds()
        protected = {v for v in (st.desired_version, st.previous_version) if v} | {r.id for r in rounds if r.state not in TERMINAL}
        finished = [r.id for r in rounds if r.state in TERMINAL and self.round_dir(r.id).exists()]
        for rid in prune_rounds(finished, protected, pol.rounds.keep_rounds):
            shutil.rmtree(self.round_dir(rid), ignore_errors=True)
            st.versions.pop(rid, None)
            log.info("pruned round checkpoints", extra={"round_id": rid})

    # ------------------------------------------------------------------ operator actions
    def rollback(self, to: str | None = None) -> RollbackResult:
        if not self.leader() or self.serving is None:
            holder, _ = self.store.lease_holder()
            raise PermissionError(f"this daemon does not run rounds; the lease holder is {holder!r}")
        if not self.serving_lock.acquire(blocking=False):
            raise RuntimeError("a deploy or rollback is in progress")
        try:
            st = self.serving.state
            if st.lora_active and (to is None or self.serving.lora_name(to) in st.lora_versions or to == self.serving.base_model_name()):
                return self._rollback_adapter(to)
            live = st.desired_version
            target = to or st.previous_version
            if target is None or target not in st.versions:
                raise ValueError(f"cannot roll back to {target!r}: known versions are {sorted(st.versions)}")
            d = self.serving.rollback("operator", to_version=target)
            if d.ok and live and live != target:
                rec = self.get_round(live)
                if rec is not None and rec.state == RoundState.DEPLOYED:
                    rec.rollback = RollbackRecord(at=time.time(), trigger="operator", to=target, ok=True)
                    self._enter(rec, RoundState.ROLLED_BACK)
            return RollbackResult(ok=d.ok, from_version=live, to=target, error=d.error, record=_deploy_summary(d.to_dict()))
        finally:
            self.serving_lock.release()

    def _rollback_adapter(self, to: str | None) -> RollbackResult:
        """Clients go back to the adapter before the active one (or `to`), or to the base model when none is kept."""
        assert self.serving is not None
        prefix = self.serving.lora_name("")
        live = self.serving.state.lora_active
        d = self.serving.rollback_lora(to=to)  # a round id, an adapter name or the base model name
        live_round = live.removeprefix(prefix) if live else None
        target_round = (d.route_model or "").removeprefix(prefix) if d.route_model and d.route_model.startswith(prefix) else "base"
        if d.ok and live_round:
            rec = self.get_round(live_round)
            if rec is not None and rec.state == RoundState.DEPLOYED:
                rec.rollback = RollbackRecord(at=time.time(), trigger="operator", to=d.route_model, ok=True)
                self._enter(rec, RoundState.ROLLED_BACK)
        return RollbackResult(ok=d.ok, from_version=live_round, to=target_round, error=d.error, record=_deploy_summary(d.to_dict()))

    def probe_drift(self) -> float | None:
        """The drift trigger's periodic probe: buffered documents vs the replay reservoir under the serving model."""
        if not self.leader() or self.serving is None or self.active:
            return None
        pol = self.get_policy()
        live = self.serving.state.desired_version
        kv = self.serving.state.versions.get(live or "")
        new = self._docs_with_keys(self.store.buffer_keys(pol.drift.probe_docs))
        ref = self._docs_with_keys(sorted(self.store.replay_keys())[: pol.drift.probe_docs])
        if kv is None or not new or not ref:
            return None
        d = self.settings.checkpoint_dir / "probe"
        d.mkdir(parents=True, exist_ok=True)
        _write_jsonl(d / "new.jsonl", [{"text": x["text"]} for x in new])
        _write_jsonl(d / "ref.jsonl", [{"text": x["text"]} for x in ref])
        spec = DriftSpec(
            model=kv.checkpoint,
            new_path=str(d / "new.jsonl"),
            ref_path=str(d / "ref.jsonl"),
            max_docs=pol.drift.probe_docs,
            max_len=pol.drift.probe_max_len,
            device=pol.train.device,
            dtype=self._served_dtype(),
        )
        cmd = [sys.executable, "-m", "daemon.jobs.drift_probe", str(spec.write(d / "drift-spec.json"))]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, preexec_fn=_pdeathsig)
        if r.returncode != 0:
            log.warning("drift probe failed", extra={"error": r.stderr[-500:]})
            return None
        x = json.loads(r.stdout.strip().splitlines()[-1])
        score = drift_score(_drift_stats(x), pol.drift)
        M.DRIFT_SCORE.labels(statistic="probe_score").set(score)
        return score

    # ------------------------------------------------------------------ children
    def _kubernetes_training(self, rec: RoundRecord, spec_path: Path, follower: _ProgressFollower) -> int:
        """CPTD_TRAIN_LAUNCHER=kubernetes: create or re-attach to the round's workload, poll it to its end.

        Progress comes from OUT/progress.jsonl on the shared volume, as for a child. Stop and lease loss leave the
        workload running (the next leader re-attaches by name); cancel deletes it. Returns 0 once the workload is
        Complete and OUT/result.json is there; raises RoundFailed with the workload's and the pods' causes otherwise."""
        from connectors.kubernetes_jobs import KubernetesLauncher, KubernetesLaunchError, WorkloadSpec, current_namespace, template_shape

        assert rec.train is not None
        s = self.settings
        ns = s.train_namespace or current_namespace()
        try:
            kl = KubernetesLauncher(getattr(self, "kube_api_client", None))
            template = kl.load_template(s.train_job_template, ns)
            nodes, gpus = template_shape(template)
            ws = WorkloadSpec(
                rec.id, 1, ns, str(spec_path), rec.train.spec_digest, template, s.train_workload, nodes, gpus, s.train_runtime
            )
            created = kl.ensure(ws)
        except KubernetesLaunchError as e:
            raise RoundFailed(f"TRAINING: {e}") from e
        log.info("training workload " + ("created" if created else "re-attached"), extra={"round": rec.id, "workload": ws.name})
        result = Path(rec.train.out_dir) / "result.json"
        last_poll, done_at, api_ok = 0.0, None, time.monotonic()
        while True:
            follower.tick()
            if self.fence is None or self._stop.is_set():
                raise Stop("lease lost" if self.fence is None else "stopping")  # the workload runs on; re-attached later
            if self.store.cancel_requested(rec.id):
                kl.delete(ws)
                raise RoundFailed("cancelled by operator", requeue=True)
            now = time.monotonic()
            if now - last_poll >= s.train_poll_s:
                last_poll = now
                try:
                    st = kl.status(ws)
                    api_ok = now
                except Exception as e:  # an API hiccup is not a failed round; five minutes of them are
                    if now - api_ok > 300:
                        raise RoundFailed(f"TRAINING: {ws.kind} {ws.name}: Kubernetes API unreachable for 300 s: {e}") from e
                    log.warning("workload status not readable", extra={"workload": ws.name, "error": str(e)})
                    st = None
                if st is not None and st.phase == "failed":
                    kl.delete_service(ws)  # the Job stays for `kubectl logs` until its TTL
                    raise RoundFailed(f"TRAINING: {ws.kind} {ws.name} failed: {st.failure()}")
                if st is not None and st.phase == "missing":
                    raise RoundFailed(f"TRAINING: {ws.kind} {ws.name} disappeared before it completed (deleted by hand or by its TTL)")
                if st is not None and st.phase == "succeeded":
                    if result.exists():
                        kl.delete(ws)
                        return 0
                    done_at = done_at or now  # a shared volume may show the file a little later than the API the Job
                    if now - done_at > 60:
                        raise RoundFailed(f"TRAINING: {ws.kind} {ws.name} completed but {result} is missing")
            self._stop.wait(min(1.0, s.train_poll_s))

    def _child(
        self,
        cmd: list[str],
        log_path: Path,
        rec: RoundRecord,
        timeout: float | None,
        on_tick: Callable[[], None] | None = None,
        hit: str | None = None,
    ) -> int:
        with open(log_path, "ab") as out:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_pdeathsig)
            if hit:
                failpoints.hit(hit)
            t0 = time.monotonic()
            while True:
                try:
                    rc = self.child.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if on_tick:
                    on_tick()
                if self.fence is None or self._stop.is_set():
                    self._kill_child()  # the trainer resumes from its last checkpoint on the next start
                    raise Stop("lease lost" if self.fence is None else "stopping")
                if self.store.cancel_requested(rec.id):
                    self._kill_child()
                    raise RoundFailed("cancelled by operator", requeue=True)
                if timeout and time.monotonic() - t0 > timeout:
                    self._kill_child()
                    raise RoundFailed(f"{cmd[2]} ran past {timeout} s")
        self.child = None
        return rc

    def _kill_child(self) -> None:
        c = self.child
        if c is not None and c.poll() is None:
            c.terminate()
            try:
                c.wait(timeout=20)
            except subprocess.TimeoutExpired:
                c.kill()
        self.child = None

    # ------------------------------------------------------------------ reading
    def status(self) -> dict[str, Any]:
        holder, epoch = self.store.lease_holder()
        out: dict[str, Any] = {
            "enabled": self.disabled is None,
            "disabled_reason": self.disabled,
            "leader": self.leader(),
            "lease_holder": holder,
            "epoch": epoch,
            "owner": self.owner,
            "active": self.active,
        }
        raw = self.store.get_serving()
        if raw:
            st = ServingState.from_json(raw)
            out["serving"] = {
                "desired_version": st.desired_version,
                "previous_version": st.previous_version,
                "replicas": {u: {"version": r.version, "status": r.status, "step": r.step} for u, r in st.replicas.items()},
                "lora_active": st.lora_active,
                "lora_versions": st.lora_versions,
                # the model name clients send: the active adapter, else the served base name
                "route_model": st.lora_active or self._base_name(),
            }
        return out

    def _served_dtype(self) -> str | None:
        """The dtype vLLM computes in (its --dtype may differ from the checkpoint's); None = the checkpoint's own."""
        if self.serving is None or not self.serving.replicas:
            return None
        try:
            return self.serving.replicas[0].server_info().dtype
        except ServingError as e:
            log.warning("served dtype unknown; scoring in the checkpoint's dtype", extra={"error": str(e)})
            return None

    def _base_name(self) -> str | None:
        if self.serving is None:
            return None
        try:
            return self.serving.base_model_name()
        except ServingError:
            return None


class _ProgressFollower:
    """Reads the trainer's progress.jsonl as it grows: metrics every tick, the record every few seconds."""

    def __init__(self, path: Path, rec: RoundRecord, runner: RoundRunner):
        self.path, self.rec, self.runner = path, rec, runner
        self.pos, self.last_put = 0, 0.0
        self.last_tokens = 0

    def tick(self, final: bool = False) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.pos)
            chunk = f.read()
        lines = chunk.split("\n")
        self.pos += len(chunk) - len(lines[-1])
        train = self.rec.train
        assert train is not None
        prog = train.progress
        for line in lines[:-1]:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev["event"] == "start":
                prog.total_steps, prog.main_steps, prog.resumed_at = ev["total_steps"], ev["main_steps"], ev["resumed_at"]
                prog.init_from, prog.new_tokens, prog.replay_tokens = ev["init_from"], ev["new_tokens"], ev["replay_tokens"]
            elif ev["event"] == "step":
                prog.step, prog.loss, prog.lr = ev["step"], ev["loss"], ev["lr"]
                prog.tokens, prog.tokens_per_s = ev["tokens"], ev["tokens_per_s"]
                train.curve = [c for c in train.curve if c[0] < ev["step"]] + [(ev["step"], round(ev["loss"], 4), ev["lr"])]
                M.TRAIN_LOSS.set(ev["loss"])
                M.TRAIN_LR.set(ev["lr"])
                M.TRAIN_STEP.set(ev["step"])
                M.TRAIN_TOKENS_PER_SECOND.set(ev["tokens_per_s"])
                if ev["tokens"] > self.last_tokens:
                    M.TRAIN_TOKENS.inc(ev["tokens"] - self.last_tokens)
                self.last_tokens = ev["tokens"]
            elif ev["event"] == "eval":
                train.evals = [e for e in train.evals if e["step"] != ev["step"]] + [
                    {k: v for k, v in ev.items() if k not in ("event", "time")}
                ]
        if final or time.monotonic() - self.last_put > 2.0:
            self.last_put = time.monotonic()
            self.runner._put(self.rec)


def record_eval_metrics(report: EvalReport, decision: GateDecision) -> None:
    """Export the chosen checkpoint's losses and the decision (metrics are defined in daemon/metrics.py)."""
    M.EVAL_LOSS.labels(split="new", model="serving").set(report.serving.new.mean_nll)
    M.EVAL_LOSS.labels(split="replay", model="serving").set(report.serving.replay.mean_nll)
    shown = next((c for c in report.candidates if c.name == decision.chosen), report.candidates[-1] if report.candidates else None)
    if shown is not None:
        M.EVAL_LOSS.labels(split="new", model="candidate").set(shown.new.mean_nll)
        M.EVAL_LOSS.labels(split="replay", model="candidate").set(shown.replay.mean_nll)
        M.EVAL_FORGETTING.set(shown.replay.mean_nll - report.serving.replay.mean_nll)
        M.EVAL_ADAPTATION.set(report.serving.new.mean_nll - shown.new.mean_nll)
    # The label is the first reason's code (policies.gates.REASONS): a small, fixed set of label values.
    reason = "" if decision.accepted else decision.reasons[0].code if decision.reasons else "none"
    M.GATE_DECISIONS.labels(decision="accept" if decision.accepted else "reject", reason=reason).inc()


def _manifest_row(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in ("key", "topic", "partition", "offset", "id", "source", "domain", "provenance")}


def _drift_stats(d: dict[str, Any]) -> DriftStats:
    """The probe's JSON line -> DriftStats (its derived figures and where it ran are recomputed or not kept)."""
    return DriftStats(**{f.name: d[f.name] for f in dataclass_fields(DriftStats) if f.name in d})


def _deploy_summary(d: dict[str, Any]) -> DeploySummary:
    pauses = [r["pause_seconds"] for r in d.get("replicas", []) if r.get("pause_seconds") is not None]
    return DeploySummary.model_validate({**d, "pause_seconds_max": max(pauses) if pauses else None})
