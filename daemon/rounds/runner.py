"""The round runner: holds the lease, turns requests into rounds, and drives one round at a time.

Only the lease holder creates and drives rounds (connectors/redis_store.py's
fenced writes). A new lease holder first learns what the replicas serve: a
predecessor may have died mid-swap (`take_over`). Requests come from the
scheduler's triggers (automatic) and from operators (manual, kept in Redis);
`policies/round_policy.py` decides whether each may start a round. A
leader-only operator request sent to another daemon (a rollback) is queued in
Redis too; the holder's control thread carries it out at once, even while a
round trains, and writes the answer the sender waits for.

The round keeps a copy of the policy it started under: a reload during a round
changes the next round, never the running one (so a resumed round is the same
round).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from connectors.redis_store import Fenced, RedisStore
from connectors.vllm import ServingConfig
from daemon import failpoints, redis_loss
from daemon import metrics as M
from daemon.replica_discovery import ReplicaDiscovery, Resolver, resolve_addresses
from daemon.round_record import TERMINAL, Parent, PhaseTimes, RollbackResult, RoundRecord, RoundState, Trigger
from daemon.rounds import deploying, drift_measure, serving_upkeep, staging
from daemon.rounds.context import BASE_VERSION, RoundContext, Stop
from daemon.rounds.state_machine import drive
from daemon.serving import ServingController, ServingState
from daemon.settings import Settings
from policies.config import Policy, policy_hash
from policies.round_policy import estimate_tokens, should_start

log = logging.getLogger("cptd.rounds")

# A control request the lease holder takes later than this is answered "expired", not carried out: an operator who was
# told "queued" minutes ago (no lease holder then) may not want that rollback any more.
CONTROL_MAX_AGE_S = 300.0
# The operator's refusals a lease holder answers with, raised again by the daemon that forwarded the request.
REFUSALS: dict[str, type[Exception]] = {"PermissionError": PermissionError, "ValueError": ValueError, "RuntimeError": RuntimeError}


class RoundRunner:
    def __init__(
        self,
        store: RedisStore,
        settings: Settings,
        get_policy: Callable[[], Policy],
        owner: str | None = None,
        kube_api_client: Any = None,
        resolve: Resolver = resolve_addresses,
    ):
        owner = owner or settings.pod_name or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ctx = RoundContext(store, settings, get_policy, owner, kube_api_client=kube_api_client)
        self.wake = threading.Event()
        self.auto: tuple[str, str] | None = None  # latest automatic trigger not acted on yet
        self.active: str | None = None
        self.taken_over_epoch = 0
        self.redis_loss: str | None = None  # why Redis is taken to have lost data (daemon/redis_loss.py); rounds wait
        self.discovery = ReplicaDiscovery(settings, resolve)
        self.discovery.refresh(probe=False)  # none may resolve yet: rounds then wait for one (`waiting`)
        self.disabled = (
            None
            if self.discovery.configured()
            else ("no vLLM replicas configured (CPTD_VLLM_URLS, CPTD_VLLM_URLS_FILE or CPTD_VLLM_CONTROL_URL)")
        )

    # ------------------------------------------------------------------ lease
    def leader(self) -> bool:
        return self.ctx.fence is not None

    def lease_loop(self, stop: threading.Event) -> None:
        ctx, last_ok = self.ctx, 0.0
        while not stop.is_set():
            ttl = self.ctx.get_policy().rounds.lease_ttl_s
            try:
                f = self.ctx.store.lease_acquire(self.ctx.owner, ttl)
                last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - Redis down: we keep the lease only until it would have expired
                log.warning("lease renewal failed", extra={"error": str(e)})
                f = ctx.fence if time.monotonic() - last_ok < ttl * 0.8 else None
            if f is not None and (ctx.fence is None or f.epoch != ctx.fence.epoch):
                log.info("took the round lease", extra={"owner": self.ctx.owner, "epoch": f.epoch})
                ctx.fence = f
                self.wake.set()
            elif f is None and ctx.fence is not None:
                log.warning("lost the round lease", extra={"owner": self.ctx.owner})
                M.LEASE_LOST.inc()
                ctx.fence = None
                ctx.stop_job()
            M.LEADER.set(1 if ctx.fence else 0)
            stop.wait(ttl / 3)
        if ctx.fence is not None:  # hand over at once rather than after the TTL
            try:
                self.ctx.store.lease_release(ctx.fence)
            except Exception:  # noqa: BLE001
                pass
            ctx.fence = None
            M.LEADER.set(0)

    # ------------------------------------------------------------------ requests
    def request(self, kind: str, detail: str) -> None:
        """Automatic triggers (scheduler jobs) land here; only the lease holder acts on them."""
        if self.leader():
            self.auto = (kind, detail)
            self.wake.set()

    def request_manual(self, reason: str = "operator") -> str:
        rid = uuid.uuid4().hex[:12]
        self.ctx.store.add_request(rid, {"kind": "manual", "detail": reason, "at": time.time()})
        self.wake.set()
        return rid

    def buffer_tokens(self) -> int:
        """Estimated tokens waiting (the buffer trigger and should_start read the same figure)."""
        return estimate_tokens(self.ctx.store.buffer_stats()["buffer_bytes"], self.ctx.get_policy().rounds)

    def next_round(self) -> str | None:
        """Act on waiting requests: start a round for the first one that may start, answer the rest."""
        policy = self.ctx.get_policy()
        manual = self.ctx.store.take_requests()
        auto, self.auto = self.auto, None
        asks: list[tuple[str | None, str]] = [(rid, r["kind"]) for rid, r in sorted(manual.items(), key=lambda kv: kv[1].get("at", 0))]
        if auto:
            asks.append((None, auto[0]))
        started: str | None = None
        if asks:  # read once: nothing changes them until a round starts, and then the rest are merged
            last_start = max((r.created_at for r in self.list_rounds(limit=1)), default=None)  # the newest round
            tokens = self.buffer_tokens()
        for req_id, kind in asks:
            if started:
                if req_id:
                    self.ctx.store.set_request_result(req_id, {"round": started, "note": "merged into the round just started"})
                continue
            check = should_start(kind, time.time(), last_start, False, tokens, policy.rounds, policy.triggers)
            if not check.start:
                if req_id:
                    self.ctx.store.set_request_result(req_id, {"round": None, "refused": check.reason})
                log.info("trigger not acted on", extra={"trigger": kind, "reason": check.reason})
                continue
            started = self.create(policy, kind, check.reason, req_id)
            if req_id:
                self.ctx.store.set_request_result(req_id, {"round": started})
        return started

    def create(self, policy: Policy, kind: str, reason: str, req_id: str | None) -> str:
        n = self.ctx.store.next_round_number(above=redis_loss.highest_round_on_disk(self.ctx.settings.checkpoint_dir))
        rid = f"r{n:05d}"
        state = self.ctx.serving.state if self.ctx.serving else ServingState()
        live = state.desired_version
        now = time.time()
        rec = RoundRecord(
            id=rid,
            number=n,
            state=RoundState.PENDING,
            created_at=now,
            updated_at=now,
            trigger=Trigger(kind=kind, reason=reason, request_id=req_id),
            owner=self.ctx.owner,
            policy_hash=policy_hash(policy),
            policy=policy,
            parent=Parent(
                version=live,
                checkpoint=state.versions[live].checkpoint if live in state.versions else None,
                adapter=state.lora_active,
                adapter_path=state.lora_paths.get(state.lora_active) if state.lora_active else None,
            ),
            phases={RoundState.PENDING: PhaseTimes(started_at=now)},
        )
        self.ctx.put(rec)
        log.info("round created", extra={"round_id": rid, "trigger": kind, "reason": reason})
        return rid

    def get_round(self, rid: str) -> RoundRecord | None:
        return self.ctx.get_round(rid)

    def list_rounds(self, limit: int | None = None) -> list[RoundRecord]:
        return self.ctx.list_rounds(limit)

    # ------------------------------------------------------------------ taking over
    def save_serving(self, state: ServingState) -> None:
        for replica in state.replicas.values():
            if replica.status == "swapping" and replica.step:
                failpoints.hit(f"deploy.{replica.step}")
        redis_loss.put_serving(self.ctx.store, self.ctx.fenced(), self.ctx.settings.checkpoint_dir, state.to_json())

    def redis_lost(self) -> bool:
        """Check Redis's history against the checkpoint volume's (daemon/redis_loss.py); True while rounds must wait."""
        try:
            cause = redis_loss.check(self.ctx.store, self.ctx.settings.checkpoint_dir)
        except Exception as e:  # noqa: BLE001 - Redis or the volume unreadable: no round could run anyway; retried
            log.warning("redis data-loss check failed", extra={"error": str(e)})
            return True
        if cause != self.redis_loss:
            if cause:
                log.error("redis data loss detected; rounds refused", extra={"cause": cause, "action": redis_loss.ACTION})
            else:
                log.info("redis history agrees with the checkpoint volume; rounds allowed", extra={"was": self.redis_loss})
        self.redis_loss = cause
        M.REDIS_DATA_LOSS.set(1 if cause else 0)
        return cause is not None

    def take_over(self) -> str | None:
        """New lease holder: learn what the replicas serve (a predecessor may have died mid-swap).

        Returns the round a predecessor left unfinished, if any: only a lease holder creates rounds,
        so after this the runner knows every unfinished round without reading the round list again."""
        ctx = self.ctx
        unfinished = next((r for r in self.list_rounds() if r.state not in TERMINAL), None)
        raw = self.ctx.store.get_serving()
        state = ServingState.from_json(raw) if raw else ServingState()
        if ctx.serving is not None:
            ctx.serving.close()
        s = self.ctx.settings
        config = ServingConfig(
            api_key=s.vllm_api_key.get_secret_value() if s.vllm_api_key else None,
            ca_file=str(s.vllm_ca_file) if s.vllm_ca_file else None,
        )
        ctx.serving = ServingController(self.discovery.urls, state, on_state=self.save_serving, config=config, store=staging.objects(ctx))
        if state.desired_version is None:
            base = s.base_checkpoint_ref()
            ctx.serving.adopt(base, BASE_VERSION)
            log.info("adopted the serving model", extra={"checkpoint": base, "version": BASE_VERSION})
        else:
            deploying_now = unfinished is not None and unfinished.state == RoundState.DEPLOYING  # its resumed deploy converges them
            deploying.reconcile_serving(ctx, roll_back_diverged=not deploying_now)
        ctx.reconcile_due = False
        if s.mlflow_tracking_uri is not None:  # rounds a predecessor ended but did not export
            ctx.tracker().kick()
        return unfinished.id if unfinished else None

    # ------------------------------------------------------------------ main loop
    def run(self, stop: threading.Event) -> None:
        if self.disabled:
            log.warning("rounds disabled", extra={"reason": self.disabled})
            return
        self.ctx.stop = stop
        threading.Thread(target=self.lease_loop, args=(stop,), name="lease", daemon=True).start()
        threading.Thread(target=self.control_loop, args=(stop,), name="control", daemon=True).start()
        threading.Thread(target=self.keep_replicas, args=(stop,), name="replicas", daemon=True).start()
        resume: str | None = None  # a round to (re)drive: left by a predecessor, or interrupted by an error here
        while not stop.is_set():
            f = self.ctx.fence
            if self.redis_lost() or f is None:  # before any take-over: never adopt replicas over a lost history
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                if self.discovery.waiting():
                    self.wake.wait(1.0)  # no replica to learn from or to serve a round: nothing is adopted or started
                    self.wake.clear()
                    continue
                if self.taken_over_epoch != f.epoch:
                    resume = self.active = self.take_over()  # `active` at once: the upkeep leaves a resumed DEPLOYING round alone
                    self.taken_over_epoch = f.epoch
                if self.ctx.reconcile_due:  # a failed deploy whose reconcile failed too: no round before the replicas agree
                    deploying.reconcile_serving(self.ctx)
                resume = resume or self.next_round()
                if resume is None:
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                self.drive(resume)
                resume = None
            except (Stop, Fenced) as e:
                log.warning("round runner paused", extra={"reason": str(e)})
            except Exception as e:  # noqa: BLE001 - the loop must survive Redis/vLLM outages; it retries
                log.exception("round runner error", extra={"error": repr(e)})
                stop.wait(5.0)
        self.ctx.stop_job()

    def keep_replicas(self, stop: threading.Event) -> None:
        """Every CPTD_VLLM_DISCOVERY_S: resolve the replicas again; the lease holder adopts the set and reconciles new
        replicas, and every rounds.reconcile_interval_s the ones found out of step (daemon/rounds/serving_upkeep.py)."""
        last_check = time.monotonic()
        while not stop.is_set():
            urls = self.discovery.refresh()
            f = self.ctx.fence
            if f is not None and self.taken_over_epoch == f.epoch:
                due = time.monotonic() - last_check >= self.ctx.get_policy().rounds.reconcile_interval_s
                try:
                    done = serving_upkeep.upkeep(self.ctx, urls, self.deploying_now, due)
                    if done is not None and done.checked:
                        last_check = time.monotonic()
                except (Stop, Fenced) as e:
                    log.warning("replica upkeep paused", extra={"reason": str(e)})
                except Exception as e:  # noqa: BLE001 - Redis or vLLM down: the next pass tries again
                    log.exception("replica upkeep error", extra={"error": repr(e)})
            stop.wait(self.ctx.settings.vllm_discovery_s)

    def deploying_now(self) -> bool:
        """Whether the round being driven (or about to be resumed) is DEPLOYING: its deploy converges the replicas."""
        rid = self.active
        rec = self.ctx.get_round(rid) if rid else None
        return rec is not None and rec.state == RoundState.DEPLOYING

    def drive(self, rid: str) -> RoundRecord:
        self.active = rid
        try:
            return drive(self.ctx, rid)
        finally:
            self.active = None

    # ------------------------------------------------------------------ operator actions and reading
    def rollback(self, to: str | None = None, wait_s: float = 60.0) -> RollbackResult:
        """Roll back here when this daemon holds the lease; otherwise queue it for the holder and wait up to `wait_s`
        for its answer (its refusal is raised here), or answer `queued` with the holder's name."""
        if self.leader():
            return deploying.rollback(self.ctx, to)
        req = uuid.uuid4().hex[:12]
        self.ctx.store.add_control(req, {"kind": "rollback", "to": to, "at": time.time()})
        res = self.ctx.store.wait_request_result(req, wait_s)
        holder, _ = self.ctx.store.lease_holder()
        if res is None:
            return RollbackResult(ok=False, to=to or "", queued=True, request_id=req, lease_holder=holder)
        if "error" in res:
            raise REFUSALS.get(res.get("refusal", ""), RuntimeError)(f"lease holder {holder}: {res['error']}")
        return RollbackResult.model_validate({**res["rollback"], "request_id": req, "lease_holder": holder})

    def control_loop(self, stop: threading.Event) -> None:
        """The lease holder carries out the control requests other daemons queued, at once (a round may be training)."""
        while not stop.wait(0.2 if self.leader() else 1.0):
            if not self.leader():
                continue
            try:
                for req, body in self.ctx.store.take_control().items():
                    self.ctx.store.set_request_result(req, self.answer_control(body))
            except Exception as e:  # noqa: BLE001 - Redis down: the requests stay queued until it is back
                log.warning("control requests not read", extra={"error": repr(e)})

    def answer_control(self, body: dict[str, Any]) -> dict[str, Any]:
        age = time.time() - float(body.get("at", 0))
        if age > CONTROL_MAX_AGE_S:
            return {"error": f"not carried out: queued {age:.0f} s ago, over {CONTROL_MAX_AGE_S:.0f} s", "refusal": "RuntimeError"}
        if body.get("kind") != "rollback":
            return {"error": f"unknown control request {body.get('kind')!r}", "refusal": "ValueError"}
        log.info("rollback requested through another daemon", extra={"to": body.get("to")})
        try:
            out = deploying.rollback(self.ctx, body.get("to"))
        except tuple(REFUSALS.values()) as e:
            return {"error": str(e), "refusal": type(e).__name__}
        return {"rollback": out.model_dump(mode="json", by_alias=True)}

    def probe_drift(self) -> float | None:
        """The drift trigger's periodic probe (skipped while a round runs)."""
        return drift_measure.probe_serving(self.ctx, busy=self.active is not None)

    def status(self) -> dict[str, Any]:
        holder, epoch = self.ctx.store.lease_holder()
        out: dict[str, Any] = {
            "enabled": self.disabled is None,
            "disabled_reason": self.disabled,
            "leader": self.leader(),
            "lease_holder": holder,
            "epoch": epoch,
            "owner": self.ctx.owner,
            "active": self.active,
            "redis_loss": {"cause": self.redis_loss, "action": redis_loss.ACTION} if self.redis_loss else None,
            "waiting": self.discovery.waiting(),  # why no round starts now (no vLLM replica), else None
        }
        raw = self.ctx.store.get_serving()
        if raw:
            state = ServingState.from_json(raw)
            out["serving"] = {
                "desired_version": state.desired_version,
                "previous_version": state.previous_version,
                "replicas": {u: {"version": r.version, "status": r.status, "step": r.step} for u, r in state.replicas.items()},
                "lora_active": state.lora_active,
                "lora_versions": state.lora_versions,
                # the model name clients send: the active adapter, else the served base name
                "route_model": state.lora_active or self.base_name(),
            }
        return out

    def base_name(self) -> str | None:
        serving = self.ctx.serving
        if serving is None:
            return None
        try:
            return serving.base_model_name()
        except Exception:  # noqa: BLE001 - ServingError: status reads never fail on a replica
            return None
