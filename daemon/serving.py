"""Serving decisions: the swap sequence, the post-deploy watch, reconcile, and LoRA adapter bookkeeping.

The daemon decides *what* to deploy; this module makes the replicas serve it,
or puts them back, and always writes down which version each replica serves,
because after a crash the daemon has nothing else to go on (`ServingState`,
`reconcile`). It decides when a swap has failed, when a watched deploy rolls
back, which adapters stay loaded and what a restarted server must be given
again. `connectors/vllm.py` is the HTTP client it drives and the checkpoint
checks it runs; that module decides nothing.

The swap sequence is docs/architecture.md §4; docs/serving.md says why each step is as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from connectors.object_store import ObjectFiles, ObjectStore, is_object_url
from connectors.vllm import (
    CheckpointError,
    CheckpointFiles,
    LocalFiles,
    Replica,
    ServingConfig,
    ServingError,
    request_errors,
    validate_checkpoint,
    validate_lora_adapter,
)
from daemon import metrics

log = logging.getLogger("cptd.serving")

# --------------------------------------------------------------------------- state


@dataclass
class ReplicaState:
    """What the daemon believes one replica serves; written before and after every step."""

    url: str
    version: str | None = None  # last verified live version; None = unknown
    checkpoint: str | None = None
    fingerprint: str | None = None  # hash of the server's weight checksums for `version`
    status: str = "unknown"  # serving | swapping | rolling_back | failed | unknown
    step: str | None = None  # step in progress (or the one that failed)
    target_version: str | None = None
    error: str | None = None
    smoke_text: str | None = None  # greedy smoke completion recorded at verification
    adapters: list[str] = field(default_factory=list)  # LoRA names loaded, oldest first
    updated_at: float = 0.0


@dataclass
class KnownVersion:
    version: str
    checkpoint: str
    fingerprint: str | None = None


@dataclass
class ServingState:
    """JSON-serialisable serving truth as the daemon last saw it (persisted in Redis by the caller)."""

    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    versions: dict[str, KnownVersion] = field(default_factory=dict)
    desired_version: str | None = None  # last fully deployed version
    previous_version: str | None = None  # what a rollback goes back to
    lora_active: str | None = None  # adapter name clients should route to
    lora_versions: list[str] = field(default_factory=list)  # adapter names loaded everywhere, oldest first
    lora_paths: dict[str, str] = field(default_factory=dict)  # adapter name -> adapter dir (to load it again)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServingState:
        d = json.loads(text)
        return cls(
            replicas={k: ReplicaState(**v) for k, v in d.get("replicas", {}).items()},
            versions={k: KnownVersion(**v) for k, v in d.get("versions", {}).items()},
            desired_version=d.get("desired_version"),
            previous_version=d.get("previous_version"),
            lora_active=d.get("lora_active"),
            lora_versions=list(d.get("lora_versions", [])),
            lora_paths=dict(d.get("lora_paths") or {}),  # absent in states written before it existed
        )


StateCallback = Callable[[ServingState], None]


# --------------------------------------------------------------------------- records


@dataclass
class StepRecord:
    step: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class ReplicaSwapRecord:
    replica: str
    from_version: str | None
    to_version: str
    ok: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    pause_seconds: float | None = None  # requests held: /pause accepted -> /resume answered
    fingerprint: str | None = None
    smoke_text: str | None = None
    error: dict[str, str] | None = None


@dataclass
class DeployRecord:
    """What the round stores about one deploy (or rollback) across all replicas."""

    kind: str  # deploy | rollback | lora | lora_rollback
    version: str
    checkpoint: str
    ok: bool = False
    replicas: list[ReplicaSwapRecord] = field(default_factory=list)
    rolled_back: list[ReplicaSwapRecord] = field(default_factory=list)
    error: dict[str, str] | None = None
    rejected: list[str] = field(default_factory=list)  # validation problems (server untouched)
    started_at: float = 0.0
    finished_at: float = 0.0
    route_model: str | None = None  # LoRA: the model name clients must send

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProbeRecord:
    replica: str
    at: float
    ok: bool
    seconds: float
    new_errors: int = 0
    detail: str = ""


@dataclass
class WatchRecord:
    window_s: float
    probes: list[ProbeRecord] = field(default_factory=list)
    regression: str | None = None
    rollback: DeployRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReconcileRecord:
    live: dict[str, str | None]  # replica -> version read from the server (None: unknown/unreachable)
    diverged: list[str]  # replicas whose live version differs from desired_version
    errors: dict[str, str] = field(default_factory=dict)
    lora_reloaded: dict[str, list[str]] = field(default_factory=dict)  # replica -> adapters it had lost, loaded again


# --------------------------------------------------------------------------- the controller


def same_place(ref: str | Path) -> str:
    """A checkpoint reference in one spelling: an s3:// URL as it is, a local path resolved."""
    return str(ref).rstrip("/") if is_object_url(str(ref)) else str(Path(ref).resolve())


DEFAULT_CONFIG = ServingConfig()  # frozen, so one instance serves every controller built without a config


class ServingController:
    """Deploys checkpoints to a set of replicas and keeps `state` true at every step.

    `on_state` is called with the whole state before and after each step; the
    daemon persists it (Redis), so whatever kills the daemon or a server, the
    last record says which step was in flight where.
    """

    def __init__(
        self,
        urls: Iterable[str],
        state: ServingState | None = None,
        on_state: StateCallback | None = None,
        config: ServingConfig = DEFAULT_CONFIG,
        store: ObjectStore | None = None,
    ):
        self.config = config
        self.store = store  # where s3:// checkpoints are read (CPTD_CHECKPOINT_URL); None: local paths only
        self.replicas = [Replica(u, config) for u in urls]
        self.state = state or ServingState()
        for r in self.replicas:
            self.state.replicas.setdefault(r.url, ReplicaState(url=r.url))
        self._on_state = on_state
        self._base_model: str | None = None

    def close(self) -> None:
        for r in self.replicas:
            r.close()

    def files(self, ref: str | Path) -> CheckpointFiles:
        """A checkpoint as the pre-swap checks read it: an s3:// URL on the object store, else a local directory."""
        if is_object_url(str(ref)):
            if self.store is None:
                raise CheckpointError(str(ref), ["an s3:// checkpoint, but no object store is configured (CPTD_CHECKPOINT_URL)"])
            return ObjectFiles(self.store, str(ref))
        return LocalFiles(Path(ref))

    # --- state helpers ---------------------------------------------------------
    def _save(self) -> None:
        if self._on_state is not None:
            self._on_state(self.state)

    def _mark(self, url: str, **changes: Any) -> None:
        rs = self.state.replicas[url]
        for k, v in changes.items():
            setattr(rs, k, v)
        rs.updated_at = time.time()
        if "version" in changes and changes["version"] is not None:
            metrics.LIVE_VERSION.labels(replica=url).info({"version": str(changes["version"])})
        self._save()

    def live_version(self, url: str) -> str | None:
        return self.state.replicas[url.rstrip("/")].version

    def base_model_name(self) -> str:
        """The served base model name (`--served-model-name`), read once from the first replica."""
        if self._base_model is None:
            self._base_model = self.replicas[0].model_name()
        return self._base_model

    def route_model(self) -> str:
        """The model name clients should send: the active LoRA adapter, else the served base model."""
        return self.state.lora_active or self.base_model_name()

    # --- the replica set (daemon/replica_discovery.py) -------------------------
    def set_replicas(self, urls: Iterable[str]) -> tuple[list[str], list[str]]:
        """Serve exactly `urls` from now on; returns (added, dropped). The caller holds the serving lock (no swap runs).

        A new replica gets a state entry that claims no version (reconcile reads what it serves); a vanished one
        leaves the state. Its client is not closed: a thread outside the lock (scoring) may still be reading.
        """
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))
        have = {r.url: r for r in self.replicas}
        added = [u for u in wanted if u not in have]
        dropped = [u for u in {**have, **self.state.replicas} if u not in wanted]  # a predecessor's old addresses too
        if added or dropped:
            self.replicas = [have.get(u) or Replica(u, self.config) for u in wanted]  # a new list: loops over the old one run on
            for u in dropped:
                self.state.replicas.pop(u, None)
                with contextlib.suppress(KeyError):  # one series per address ever seen would grow without bound
                    metrics.LIVE_VERSION.remove(u)
            for u in added:
                self.state.replicas.setdefault(u, ReplicaState(url=u))
            self._save()
        return added, dropped

    def out_of_step(self) -> list[str]:
        """Replicas that may not serve what the state says, from cheap reads (/health, the label, the adapter list).

        The periodic check: a server restarted behind the daemon's back reports the label "default" and has
        lost its runtime adapters, so no weight checksum is needed to find it; only then does reconcile run.
        An unreachable replica counts only while the state still claims a version for it.
        """
        wanted = set(self.state.lora_versions) | ({self.state.lora_active} if self.state.lora_active else set())
        out = []
        for r in list(self.replicas):
            rs = self.state.replicas.get(r.url) or ReplicaState(url=r.url)
            try:
                if not r.health():
                    raise ServingError(r.url, "health", "/health did not answer 200")
                ok = (
                    rs.version is not None
                    and rs.version == self.state.desired_version
                    and r.weight_version() == rs.version
                    and (not wanted or wanted <= set(r.model_ids()))
                )
            except ServingError:
                ok = rs.version is None and rs.status == "unknown"  # already known lost: reconcile would change nothing
            if not ok:
                out.append(r.url)
        return out

    # --- adopt -----------------------------------------------------------------
    def adopt(self, checkpoint: str, version: str) -> None:
        """Take over servers that were started with `checkpoint`: label them `version` and remember its fingerprint."""
        for r in self.replicas:
            fp = r.fingerprint()
            r.set_weight_version(version)
            smoke = r.complete(self.config.smoke_prompt, self.config.smoke_max_tokens)
            self.state.versions[version] = KnownVersion(version, str(checkpoint), fp)
            self._mark(
                r.url,
                version=version,
                checkpoint=str(checkpoint),
                fingerprint=fp,
                status="serving",
                step=None,
                target_version=None,
                error=None,
                smoke_text=smoke,
            )
        self.state.desired_version = version
        self._save()

    # --- full-weight swap ------------------------------------------------------
    def _step(self, rec: ReplicaSwapRecord, r: Replica, step: str, fn: Callable[[], Any]) -> Any:
        self._mark(r.url, step=step)
        t = time.monotonic()
        try:
            out = fn()
        except ServingError as e:
            rec.steps.append(StepRecord(step, False, time.monotonic() - t, e.message))
            raise
        except Exception as e:  # noqa: BLE001 - anything else still names replica + step
            rec.steps.append(StepRecord(step, False, time.monotonic() - t, repr(e)))
            raise ServingError(r.url, step, repr(e)) from e
        rec.steps.append(StepRecord(step, True, time.monotonic() - t))
        return out

    def _swap_one(self, r: Replica, checkpoint: str, version: str, status: str, expect_fingerprint: str | None = None) -> ReplicaSwapRecord:
        rs = self.state.replicas[r.url]
        rec = ReplicaSwapRecord(replica=r.url, from_version=rs.version, to_version=version)
        old_fp = rs.fingerprint
        self._mark(r.url, status=status, target_version=version, error=None)
        paused_at: float | None = None
        try:
            try:
                if old_fp is None:
                    old_fp = self._step(rec, r, "checksum_before", r.fingerprint)
                self._step(rec, r, "pause", r.pause)
                paused_at = time.monotonic()
                # From here the replica's weights are in flux: the state must not claim a version.
                self._mark(r.url, version=None)
                self._step(rec, r, "reload_weights", lambda: r.reload_weights(checkpoint))
                self._step(rec, r, "reset_prefix_cache", r.reset_prefix_cache)
                # Labelled before resume (the original design did it after): no output of the new weights
                # ever carries the old version.
                self._step(rec, r, "update_weight_version", lambda: r.set_weight_version(version))
                self._step(rec, r, "resume", r.resume)
                rec.pause_seconds = time.monotonic() - paused_at
                paused_at = None
                metrics.SWAP_PAUSE_SECONDS.labels(replica=r.url).observe(rec.pause_seconds)
                live = self._step(rec, r, "verify_weight_info", r.weight_version)
                if live != version:
                    raise ServingError(r.url, "verify_weight_info", f"server reports {live!r}, expected {version!r}")
                fp = self._step(rec, r, "verify_checksum", r.fingerprint)
                if expect_fingerprint is not None and fp != expect_fingerprint:
                    raise ServingError(r.url, "verify_checksum", f"fingerprint {fp} != recorded {expect_fingerprint} for {version}")
                # Unchanged checksums mean a silent no-op reload, unless the replica's weights were unknown before
                # (a swap cut off by a daemon crash may already have loaded exactly these weights).
                if (
                    expect_fingerprint is None
                    and fp == old_fp
                    and rec.from_version is not None
                    and same_place(checkpoint) != same_place(rs.checkpoint or "")
                ):
                    raise ServingError(r.url, "verify_checksum", "weight checksums unchanged after reload")
                smoke = self._step(rec, r, "verify_smoke", lambda: r.complete(self.config.smoke_prompt, self.config.smoke_max_tokens))
            finally:
                if paused_at is not None:
                    # Whatever cut the swap short (a failed step, a Redis error or Fenced from the state save,
                    # Stop), the replica must not keep holding client requests: nothing else would resume it.
                    self._resume_after_failure(r, rec, paused_at)
        except ServingError as e:
            rec.error = e.to_dict()
            self._mark(r.url, status="failed", step=e.step, error=str(e))
            return rec
        rec.ok, rec.fingerprint, rec.smoke_text = True, fp, smoke
        self.state.versions.setdefault(version, KnownVersion(version, str(checkpoint), fp)).fingerprint = fp
        self._mark(
            r.url,
            status="serving",
            version=version,
            checkpoint=str(checkpoint),
            fingerprint=fp,
            step=None,
            target_version=None,
            error=None,
            smoke_text=smoke,
        )
        return rec

    @staticmethod
    def _resume_after_failure(r: Replica, rec: ReplicaSwapRecord, paused_at: float) -> None:
        """Resume a replica a cut-short swap left paused; a failure here is logged, never raised over the cause."""
        try:
            r.resume()
            rec.pause_seconds = time.monotonic() - paused_at
        except ServingError as e:
            log.error("replica left paused: resume after a failed swap failed", extra={"replica": r.url, "error": str(e)})

    def validate(
        self, candidate: str | Path, version: str, adapter: bool = False, max_rank: int | None = None, reference: str | Path | None = None
    ) -> None:
        """The checks a deploy makes before it touches any replica (CheckpointError names each problem): a full
        checkpoint against the served one (config, tensors, tokenizer), an adapter's rank and files and its unused
        name. A shadow round asks exactly this, so what it says it would have deployed would have passed them."""
        if adapter:
            validate_lora_adapter(candidate, max_rank)
            name = self.lora_name(version)
            if name in self.state.lora_versions:
                raise CheckpointError(str(candidate), [f"adapter name {name} already used; a new round needs a new name"])
            return
        prev = self.state.desired_version
        ref = reference or (self.state.versions[prev].checkpoint if prev in self.state.versions else None)
        if ref is None:
            raise ValueError("no reference checkpoint: adopt() the serving checkpoint first or pass reference=")
        validate_checkpoint(self.files(candidate), self.files(ref))

    def deploy(self, checkpoint: str | Path, version: str, reference: str | Path | None = None) -> DeployRecord:
        """Swap every replica, one at a time; if any fails, every replica touched goes back."""
        checkpoint = same_place(checkpoint)
        rec = DeployRecord(kind="deploy", version=version, checkpoint=checkpoint, started_at=time.time())
        prev = self.state.desired_version
        try:
            self.validate(checkpoint, version, reference=reference)
        except CheckpointError as e:
            rec.rejected = e.problems
            rec.error = {"replica": "", "step": "validate", "message": str(e)}
            rec.finished_at = time.time()
            return rec
        touched: list[Replica] = []
        for r in self.replicas:
            touched.append(r)
            one = self._swap_one(r, checkpoint, version, "swapping")
            rec.replicas.append(one)
            metrics.SWAPS.labels(replica=r.url, result="ok" if one.ok else "failed").inc()
            if not one.ok:
                rec.error = one.error
                break
        else:
            rec.ok = True
            if prev != version:
                self.state.previous_version = prev
            self.state.desired_version = version
            self._save()
            rec.finished_at = time.time()
            return rec
        metrics.ROLLBACKS.labels(trigger="swap_failed").inc()
        if prev is not None:
            rec.rolled_back = self._restore(reversed(touched), prev)
        rec.finished_at = time.time()
        return rec

    def _restore(self, replicas: Iterable[Replica], version: str) -> list[ReplicaSwapRecord]:
        kv = self.state.versions[version]
        out = []
        for r in replicas:
            one = self._swap_one(r, kv.checkpoint, version, "rolling_back", expect_fingerprint=kv.fingerprint)
            metrics.SWAPS.labels(replica=r.url, result="rolled_back" if one.ok else "failed").inc()
            out.append(one)
        return out

    def rollback(self, trigger: str = "operator", to_version: str | None = None, only: Iterable[str] | None = None) -> DeployRecord:
        """Put every replica (or those in `only`) back on `to_version` (default: the version before the last deploy)."""
        target = to_version or self.state.previous_version
        if target is None or target not in self.state.versions:
            raise ValueError(f"nothing to roll back to (target {target!r} unknown)")
        kv = self.state.versions[target]
        metrics.ROLLBACKS.labels(trigger=trigger).inc()
        rec = DeployRecord(kind="rollback", version=target, checkpoint=kv.checkpoint, started_at=time.time())
        chosen = None if only is None else set(only)
        rec.replicas = self._restore([r for r in self.replicas if chosen is None or r.url in chosen], target)
        rec.ok = all(x.ok for x in rec.replicas)
        if not rec.ok:
            rec.error = next(x.error for x in rec.replicas if not x.ok)
        else:
            if self.state.desired_version != target:
                self.state.previous_version, self.state.desired_version = None, target
            self._save()
        rec.finished_at = time.time()
        return rec

    # --- post-deploy watch ---------------------------------------------------------
    def watch(self, window_s: float, rollback: bool = True) -> WatchRecord:
        """Probe every replica for `window_s`; a failed probe, a changed greedy smoke text or new 5xx roll back."""
        rec = WatchRecord(window_s=window_s)
        base: dict[str, int] = {}
        for r in self.replicas:
            try:
                base[r.url] = request_errors(r.metrics_text())
            except ServingError:
                base[r.url] = 0
        deadline = time.monotonic() + window_s
        while rec.regression is None:
            for r in self.replicas:
                t = time.monotonic()
                probe = ProbeRecord(replica=r.url, at=time.time(), ok=True, seconds=0.0)
                try:
                    text = r.complete(self.config.smoke_prompt, self.config.smoke_max_tokens, step="watch_smoke")
                    probe.new_errors = request_errors(r.metrics_text()) - base[r.url]
                    expected = self.state.replicas[r.url].smoke_text
                    if expected is not None and text != expected:
                        probe.ok, probe.detail = False, f"greedy smoke completion changed: {text!r} != {expected!r}"
                    elif probe.new_errors > self.config.watch_max_new_errors:
                        probe.ok, probe.detail = False, f"{probe.new_errors} new failed requests"
                except ServingError as e:
                    probe.ok, probe.detail = False, str(e)
                probe.seconds = time.monotonic() - t
                rec.probes.append(probe)
                if not probe.ok:
                    rec.regression = f"{r.url}: {probe.detail}"
                    break
            if time.monotonic() >= deadline:
                break
            # Pace the probes without sleeping past the window's end.
            time.sleep(max(0.0, min(self.config.watch_interval_s, deadline - time.monotonic())))
        if rec.regression and rollback and self.state.previous_version is not None:
            rec.rollback = self.rollback(trigger="watch")
        return rec

    # --- reconcile -------------------------------------------------------------
    def reconcile(self) -> ReconcileRecord:
        """Read the truth from each server (after a daemon or server crash) and make the state say it.

        A restarted server reports weight_version "default" and serves its boot
        checkpoint; the version is then identified by its weight fingerprint.
        It has also lost every adapter loaded at runtime: the kept LoRA versions
        (`lora_versions`, `lora_active`) it no longer lists are loaded again from
        `lora_paths` (`ReconcileRecord.lora_reloaded`).
        """
        out = ReconcileRecord(live={}, diverged=[])
        by_fp = {kv.fingerprint: kv for kv in self.state.versions.values() if kv.fingerprint}
        for r in self.replicas:
            try:
                if r.is_paused():  # a daemon killed mid-swap leaves the replica holding requests
                    r.resume()
                reported = r.weight_version()
                fp = r.fingerprint()
            except ServingError as e:
                out.live[r.url] = None
                out.errors[r.url] = str(e)
                self._mark(r.url, version=None, status="unknown", error=str(e))
                continue
            kv = self.state.versions.get(reported)
            if kv is None or (kv.fingerprint is not None and kv.fingerprint != fp):
                kv = by_fp.get(fp)
            if kv is None:
                out.live[r.url] = None
                self._mark(
                    r.url,
                    version=None,
                    fingerprint=fp,
                    status="unknown",
                    error=f"server weights (version {reported!r}, fingerprint {fp}) match no known version",
                )
            else:
                if reported != kv.version:
                    r.set_weight_version(kv.version)
                out.live[r.url] = kv.version
                self._mark(
                    r.url,
                    version=kv.version,
                    checkpoint=kv.checkpoint,
                    fingerprint=fp,
                    status="serving",
                    step=None,
                    target_version=None,
                    error=None,
                    smoke_text=r.complete(self.config.smoke_prompt, self.config.smoke_max_tokens),
                )
            self._reload_adapters(r, out)
            if out.live[r.url] != self.state.desired_version:
                out.diverged.append(r.url)
        return out

    # --- LoRA ------------------------------------------------------------------
    def lora_name(self, version: str) -> str:
        return f"{self.config.lora_prefix}-{version}"

    def lora_refusal(self, rank: int) -> str | None:
        """None when every replica can take an adapter of rank `rank` at runtime; else why not, per replica.

        The daemon asks before training a LoRA round and refuses the round with
        this message (training an adapter no server can load wastes the round).
        Reads `/server_info` (see `Replica.server_info`: the first call after a
        server start takes ~1.5 s).
        """
        problems: list[str] = []
        for r in self.replicas:
            try:
                info = r.server_info()
            except ServingError as e:
                problems.append(
                    f"vLLM replica {r.url}: /server_info unreachable ({e.message}); the server must run with VLLM_SERVER_DEV_MODE=1"
                )
                continue
            if not info.lora_enabled:
                problems.append(f"vLLM replica {r.url}: started without --enable-lora")
            elif info.max_lora_rank is not None and info.max_lora_rank < rank:
                problems.append(f"vLLM replica {r.url}: --max-lora-rank {info.max_lora_rank} < policy train.lora_r {rank}")
            if not info.runtime_lora_updating:
                problems.append(
                    f"vLLM replica {r.url}: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not set (adapters cannot be loaded into the running server)"
                )
        return "; ".join(problems) or None

    def deploy_lora(self, adapter_dir: str | Path, version: str, max_rank: int | None = None) -> DeployRecord:
        """Load the round's adapter under a new versioned name everywhere, then unload versions beyond `lora_keep`.

        A name is never reused: vLLM keys its prefix cache by adapter name, so
        reloading under the same name could serve KV computed by the old adapter.
        """
        path = str(Path(adapter_dir).resolve())
        name = self.lora_name(version)
        rec = DeployRecord(kind="lora", version=version, checkpoint=path, started_at=time.time(), route_model=name)
        try:
            self.validate(path, version, adapter=True, max_rank=max_rank)
        except CheckpointError as e:
            rec.rejected, rec.error, rec.finished_at = e.problems, {"replica": "", "step": "validate", "message": str(e)}, time.time()
            return rec
        done: list[Replica] = []
        for r in self.replicas:
            one = ReplicaSwapRecord(replica=r.url, from_version=self.state.lora_active, to_version=name)
            rec.replicas.append(one)
            try:
                self._mark(r.url, step="load_lora_adapter", target_version=name)
                self._step(one, r, "load_lora_adapter", partial(r.load_lora, name, path))
                done.append(r)
                listed = self._step(one, r, "verify_models", r.model_ids)
                if name not in listed:
                    raise ServingError(r.url, "verify_models", f"{name} not listed in /v1/models")
                smoke = partial(r.complete, self.config.smoke_prompt, self.config.smoke_max_tokens, model=name)
                one.smoke_text = self._step(one, r, "verify_smoke", smoke)
                one.ok = True
                self._mark(r.url, adapters=self.state.replicas[r.url].adapters + [name], step=None, target_version=None)
            except ServingError as e:
                one.error = rec.error = e.to_dict()
                self._mark(r.url, step=e.step, error=str(e))
                break
        if rec.error:
            for r in done:  # clients keep routing to the previous adapter; remove the half-deployed one
                try:
                    r.unload_lora(name)
                    self._mark(r.url, adapters=[a for a in self.state.replicas[r.url].adapters if a != name])
                except ServingError:
                    pass
            rec.finished_at = time.time()
            return rec
        self.state.lora_versions.append(name)
        self.state.lora_paths[name] = path
        self.state.lora_active = name
        self._save()
        while len(self.state.lora_versions) > self.config.lora_keep:
            old = self.state.lora_versions.pop(0)
            self.state.lora_paths.pop(old, None)
            self._unload_everywhere(old, rec)
        rec.ok = True
        rec.finished_at = time.time()
        return rec

    def _lora_target(self, to: str | None) -> tuple[str | None, list[str]]:
        """(adapter to make active or None for the base model, adapter names rolled back over)."""
        hist, active = self.state.lora_versions, self.state.lora_active
        if active is None:
            raise ValueError("nothing to roll back to: no LoRA adapter is active (clients already use the base model)")
        ai = hist.index(active) if active in hist else len(hist)
        older = hist[:ai]
        if to is None:
            target = older[-1] if older else None
        elif to in older or self.lora_name(to) in older:
            target = to if to in older else self.lora_name(to)
        elif to == self.base_model_name():
            target = None
        else:
            raise ValueError(f"nothing to roll back to: adapter {to!r} is not an older kept version (kept: {older}, active: {active!r})")
        keep = hist[: older.index(target) + 1] if target is not None else []
        return target, [n for n in hist if n not in keep] + ([active] if active not in hist else [])

    def rollback_lora(self, to: str | None = None, trigger: str = "operator") -> DeployRecord:
        """Make the adapter before `lora_active` (or `to`: an adapter name or round version; or the base model) active.

        With no older adapter kept, clients go back to the served base model.
        Per replica the target adapter must be listed in /v1/models (one lost in a
        server restart is loaded again from `lora_paths`) and answer a smoke
        completion; only then does `lora_active` change. The adapters rolled back
        over are then dropped from `lora_versions` and unloaded (an unload failure
        is noted in `rejected`, not fatal). ValueError when nothing is older.
        """
        target, dropped = self._lora_target(to)
        route = target or self.base_model_name()
        active = self.state.lora_active
        metrics.ROLLBACKS.labels(trigger=trigger).inc()
        rec = DeployRecord(
            kind="lora_rollback",
            version=route,
            checkpoint=self.state.lora_paths.get(target, "") if target else "",
            started_at=time.time(),
            route_model=route,
        )
        for r in self.replicas:
            one = ReplicaSwapRecord(replica=r.url, from_version=active, to_version=route)
            rec.replicas.append(one)
            try:
                self._mark(r.url, step="lora_rollback", target_version=route)
                if target is not None:
                    self._ensure_adapter(one, r, target)
                smoke = partial(r.complete, self.config.smoke_prompt, self.config.smoke_max_tokens, model=route)
                one.smoke_text = self._step(one, r, "verify_smoke", smoke)
                one.ok = True
                self._mark(r.url, step=None, target_version=None)
            except ServingError as e:  # clients keep routing to `active`, which is still loaded
                one.error = rec.error = e.to_dict()
                self._mark(r.url, step=e.step, error=str(e), target_version=None)
                rec.finished_at = time.time()
                return rec
        self.state.lora_active = target
        self.state.lora_versions = [n for n in self.state.lora_versions if n not in dropped]
        for n in dropped:
            self.state.lora_paths.pop(n, None)
        self._save()
        for old in dropped:
            self._unload_everywhere(old, rec)
        rec.ok = True
        rec.finished_at = time.time()
        return rec

    def _unload_everywhere(self, name: str, rec: DeployRecord) -> None:
        for r in self.replicas:
            try:
                r.unload_lora(name)
            except ServingError as e:
                rec.rejected.append(f"unload {name} on {r.url}: {e}")  # stale but harmless: noted, not fatal
            self._mark(r.url, adapters=[a for a in self.state.replicas[r.url].adapters if a != name])

    def _ensure_adapter(self, rec: ReplicaSwapRecord, r: Replica, name: str) -> bool:
        """Make sure `name` is listed on `r`, loading it again from `lora_paths` if the server lost it; True if loaded."""
        if name in self._step(rec, r, "verify_models", r.model_ids):
            return False
        path = self.state.lora_paths.get(name)
        if path is None:
            raise ServingError(r.url, "load_lora_adapter", f"{name} not loaded and no adapter path recorded for it")
        self._step(rec, r, "load_lora_adapter", partial(r.load_lora, name, path))
        if name not in self._step(rec, r, "verify_models", r.model_ids):
            raise ServingError(r.url, "verify_models", f"{name} not listed in /v1/models after loading it again")
        adapters = self.state.replicas[r.url].adapters
        if name not in adapters:
            self._mark(r.url, adapters=adapters + [name])
        return True

    def _reload_adapters(self, r: Replica, out: ReconcileRecord) -> None:
        """Reconcile's LoRA half: load kept adapters a (restarted) replica no longer lists."""
        wanted = list(self.state.lora_versions)
        if self.state.lora_active is not None and self.state.lora_active not in wanted:
            wanted.append(self.state.lora_active)
        if not wanted:
            return
        scratch = ReplicaSwapRecord(replica=r.url, from_version=None, to_version=self.state.lora_active or "")
        reloaded: list[str] = []
        try:
            for name in wanted:
                if self._ensure_adapter(scratch, r, name):
                    reloaded.append(name)
            if self.state.lora_active in reloaded:
                model = self.state.lora_active
                self._step(
                    scratch, r, "verify_smoke", partial(r.complete, self.config.smoke_prompt, self.config.smoke_max_tokens, model=model)
                )
            self._mark(r.url, adapters=list(wanted), step=None)
        except ServingError as e:
            prev = out.errors.get(r.url)
            out.errors[r.url] = f"{prev}; {e}" if prev else str(e)
            self._mark(r.url, step=None, error=str(e))
        if reloaded:
            out.lora_reloaded[r.url] = reloaded
