"""What finished rounds leave behind stays bounded: directories pruned at every end state, a free-space check at
PENDING, old records archived out of Redis, listings that read a bounded number of records, a downsampled loss
curve, paged manifests, expiring request results and cancel marks (docs/architecture.md §2, §3 Retention).

Real Redis; no vLLM (the serving controller points at a port nothing listens on: nothing here calls a replica).
The rounds driven here end at PENDING, so each test takes well under a second past the Redis start.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import redis as redis_lib
from fastapi.testclient import TestClient

from connectors.redis_store import RedisStore
from daemon.api import create_app
from daemon.app import Daemon
from daemon.dev.services import free_port
from daemon.jobs.specs import TrainSpec
from daemon.round_record import CURVE_POINTS, Parent, RoundState, Snapshot, TrainRecord
from daemon.rounds.context import RoundContext
from daemon.rounds.pending import pending
from daemon.rounds.retention import protected, tidy
from daemon.rounds.state_machine import drive
from daemon.rounds.training import ProgressRecorder
from daemon.serving import KnownVersion, ReplicaState, ServingController, ServingState
from daemon.settings import Settings
from policies.config import Policy
from policies.round_policy import RoundsPolicy, round_disk_bytes, volume_bytes
from tests.job_context import CancelFlag, bare_record, job_context

GB = 10**9


def _policy(**rounds: object) -> Policy:
    return Policy(rounds=RoundsPolicy.model_validate(rounds))


def _context(store: RedisStore, tmp_path: Path, policy: Policy, state: ServingState | None = None) -> RoundContext:
    ctx = RoundContext(store, Settings(checkpoint_dir=tmp_path / "ck"), get_policy=lambda: policy, owner="keep-test")
    ctx.fence = store.lease_acquire(ctx.owner, 60)
    state = state or ServingState(versions={"base": KnownVersion("base", "/ck/base", "fp")}, desired_version="base")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a replica call would be an error
    state.replicas = {url: ReplicaState(url=url, version=state.desired_version, status="serving")}
    ctx.serving = ServingController([url], state, on_state=lambda s: None)
    return ctx


def _ended(ctx: RoundContext, rid: str, state: RoundState, with_dir: bool = True) -> None:
    rec = bare_record(rid, state)
    rec.policy = ctx.get_policy()
    ctx.put(rec)
    if with_dir:
        (ctx.round_dir(rid) / "train").mkdir(parents=True)
        (ctx.round_dir(rid) / "train" / "optimizer.bin").write_bytes(b"x" * 1024)


def _pending_round(ctx: RoundContext, rid: str, parent_checkpoint: Path | None = None) -> None:
    rec = bare_record(rid, RoundState.PENDING)
    rec.policy = ctx.get_policy()
    rec.parent = Parent(version="base", checkpoint=str(parent_checkpoint) if parent_checkpoint else None)
    ctx.put(rec)


def _checkpoint(directory: Path, weight_bytes: int) -> Path:
    """A parent checkpoint whose weights file is `weight_bytes` long (sparse: it takes no disk)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "hidden_size": 4096}))
    with (directory / "model.safetensors").open("wb") as f:
        f.truncate(weight_bytes)
    return directory


# ---------------------------------------------------------------------------------------------- disk


def test_a_failed_round_prunes_directories_but_never_what_serving_needs(redis_client: redis_lib.Redis, tmp_path: Path):
    store = RedisStore(redis_client, "keep")
    state = ServingState(
        versions={v: KnownVersion(v, f"/ck/{v}", "fp") for v in ("base", "r00001", "r00002", "r00004")},
        desired_version="r00002",
        previous_version="r00001",
    )
    ctx = _context(store, tmp_path, _policy(keep_rounds=1, min_free_gb=10**9), state)
    state.lora_paths = {"cptd-r00003": str(ctx.round_dir("r00003") / "train" / "final")}  # an adapter still kept
    for rid, end in [("r00001", "ROLLED_BACK"), ("r00002", "DEPLOYED"), ("r00003", "DEPLOYED"), ("r00004", "REJECTED")]:
        _ended(ctx, rid, RoundState(end))
    _ended(ctx, "r00005", RoundState.FAILED)
    (ctx.round_dir("r00099") / "train").mkdir(parents=True)  # a directory Redis does not know: left alone
    _pending_round(ctx, "r00006")

    out = drive(ctx, "r00006")  # refused for space: FAILED at PENDING

    assert out.state == RoundState.FAILED
    left = sorted(p.name for p in (tmp_path / "ck" / "rounds").iterdir())
    # keep_rounds 1: r00005 is the newest finished directory (r00006 wrote none); live, rollback target, adapter kept
    assert left == ["r00001", "r00002", "r00003", "r00005", "r00099"], left
    assert "r00004" not in state.versions
    state.lora_versions = [ctx.serving.lora_name("r00005")]  # an adapter loaded everywhere, by name only
    assert "r00005" in protected(ctx)


def test_finished_rounds_shed_their_resumable_checkpoints_but_the_chosen_and_the_served(redis_client: redis_lib.Redis, tmp_path: Path):
    """Nothing trains from a finished round's checkpoints again: all but the gate's choice and what serving names go,
    whatever the end state; a round still running keeps all of them."""
    store = RedisStore(redis_client, "shed")
    state = ServingState(versions={"base": KnownVersion("base", "/ck/base", "fp")}, desired_version="base")
    ctx = _context(store, tmp_path, _policy(keep_rounds=10), state)
    steps = ("step-00000004", "step-00000008", "step-00000012", "step-00000016.tmp")
    for rid, end in [("r00001", RoundState.DEPLOYED), ("r00002", RoundState.REJECTED), ("r00003", RoundState.TRAINING)]:
        out = ctx.round_dir(rid) / "train"
        for name in steps:
            (out / "checkpoints" / name).mkdir(parents=True)
            (out / "checkpoints" / name / "model.safetensors").write_bytes(b"w")
        (out / "mainline").mkdir()
        rec = bare_record(rid, end)
        spec = TrainSpec(parent_dir=str(tmp_path / "base"), out_dir=str(out), new_path=str(tmp_path / "new.jsonl"))
        rec.train = TrainRecord(spec=spec, spec_digest=spec.digest(), out_dir=str(out), launcher="subprocess")
        rec.candidate = str(out / "checkpoints" / "step-00000008") if end == RoundState.DEPLOYED else None  # a gate that accepted
        ctx.put(rec)
    # an older version still named by serving (a rollback target, say) lives in a checkpoint the record did not choose
    state.versions["r00001"] = KnownVersion("r00001", str(ctx.round_dir("r00001") / "train" / "checkpoints" / "step-00000004"), "fp")

    tidy(ctx)

    def left(rid: str) -> list[str]:
        return sorted(p.name for p in (ctx.round_dir(rid) / "train" / "checkpoints").iterdir())

    assert left("r00001") == ["step-00000004", "step-00000008"]
    assert left("r00002") == []  # rejected: its weights serve nobody
    assert left("r00003") == sorted(steps)  # still training
    assert all((ctx.round_dir(r) / "train" / "mainline").is_dir() for r in ("r00001", "r00002", "r00003"))


def test_pending_refuses_a_round_the_volume_cannot_hold(redis_client: redis_lib.Redis, tmp_path: Path):
    store = RedisStore(redis_client, "keep")
    ctx = _context(store, tmp_path, _policy())
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    huge = _checkpoint(tmp_path / "huge", free)  # its checkpoints, masters and optimizer state would need ~10x free
    _pending_round(ctx, "r00001", huge)

    out = drive(ctx, "r00001")

    assert out.state == RoundState.FAILED and out.snapshot is None, out
    assert out.error is not None and "bytes free" in out.error and "needs" in out.error, out.error
    assert out.docs is not None and out.docs.fate == "requeued" and out.docs.docs == 0
    # a small parent passes, and the operator's figure replaces the estimate
    _pending_round(ctx, "r00002", _checkpoint(tmp_path / "small", 4096))
    rec = ctx.get_round("r00002")
    assert rec is not None
    pending(ctx, rec)
    assert rec.state == RoundState.SNAPSHOT


def test_round_disk_estimate_counts_checkpoints_optimizer_and_mainline():
    p = 2 * GB  # a 1B-parameter bf16 parent
    full = round_disk_bytes(p, 2, "full", keep_checkpoints=3, mainline=False)
    # a checkpoint: weights 2 GB + fp32 masters 4 GB + AdamW moments 8 GB, the moments in the newest only; at the
    # peak the newest and the one being written hold them, two older ones do not, then final/
    assert full == 2 * 14 * GB + 2 * 6 * GB + 2 * GB
    assert round_disk_bytes(p, 2, "full", keep_checkpoints=3, mainline=True) == full + 14 * GB
    assert round_disk_bytes(4 * GB, 4, "full", keep_checkpoints=1, mainline=False) == 2 * 12 * GB + 4 * GB  # fp32: no masters
    adapter = round_disk_bytes(p, 2, "lora", keep_checkpoints=3, mainline=False, adapter_fraction=2 * 16 / 4096)
    assert adapter < full / 50


def test_the_multi_gpu_overlay_volume_holds_an_8b_deployment_in_its_steady_state():
    """Issue 23: the volume the manifests request matches what a round and retention keep, for the shape the overlay
    ships for (Llama-3-8B, full weights, bf16) under its own policy: the base, the running round at its peak and
    the finished rounds retention keeps (each shed to its candidate's weights and main line)."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from policies.config import load_policy

    repo = Path(__file__).resolve().parents[1]
    policy = load_policy(repo / "deploy" / "k8s" / "overlays" / "multi-gpu" / "policy.yaml")
    shape = json.loads((repo / "tests" / "data" / "model_shapes" / "llama-3-8b.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape))
    parent = 2 * sum(p.numel() for p in model.parameters())  # bf16
    need = volume_bytes(
        parent,
        2,
        policy.train.mode,
        policy.train.keep_checkpoints,
        mainline=policy.schedule.kind == "infinite",
        keep_rounds=policy.rounds.keep_rounds,
    )
    built = subprocess.run(
        ["kubectl", "kustomize", str(repo / "deploy" / "k8s" / "overlays" / "multi-gpu")], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    pvc = next(
        d
        for d in yaml.safe_load_all(built.stdout)
        if d and d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("checkpoints")
    )
    size = pvc["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") or size.endswith("Ti"), size
    requested = int(size[:-2]) * (2**30 if size.endswith("Gi") else 2**40)
    assert need <= requested, f"the overlay requests {size}, an 8B deployment needs {need / 2**30:.0f} GiB"
    assert requested <= 1.5 * need, f"the overlay requests {size}, over 1.5x the {need / 2**30:.0f} GiB needed"


# ---------------------------------------------------------------------------------------------- Redis


def test_old_records_are_archived_and_still_served(redis_client: redis_lib.Redis, tmp_path: Path):
    store = RedisStore(redis_client, "keep")
    ctx = _context(store, tmp_path, _policy(keep_records=3, min_free_gb=10**9))
    for n in range(1, 9):
        _ended(ctx, f"r{n:05d}", RoundState.REJECTED, with_dir=False)
    before = store.get_round("r00002")
    _pending_round(ctx, "r00009")
    store.request_cancel("r00009")  # the operator cancels it: its mark must not outlive it

    out = drive(ctx, "r00009")

    assert out.state == RoundState.FAILED and out.error == "cancelled by operator"
    assert store.round_ids() == ["r00007", "r00008", "r00009"]
    assert sorted(p.name for p in (tmp_path / "ck" / "records").iterdir()) == [f"r{n:05d}.json" for n in range(1, 7)]
    archived = ctx.get_round("r00002")
    assert archived is not None and archived.to_store() == before
    assert store.cancel_marks() == []

    daemon = _daemon(redis_client, tmp_path)
    redis_client.config_resetstat()
    assert [s.id for s in daemon.rounds(limit=2)] == ["r00009", "r00008"]
    assert daemon.status()["rounds"]["latest"]["id"] == "r00009"
    shown = daemon.round("r00003")
    assert shown is not None and shown.state == RoundState.REJECTED  # from the archive
    assert "cmdstat_hvals" not in redis_client.info("commandstats")  # no read of every record
    assert daemon.round("../records/r00001") is None  # an id is never a path


def test_the_newest_round_of_a_kind_is_found_without_reading_them_all(redis_client: redis_lib.Redis, tmp_path: Path):
    store = RedisStore(redis_client, "keep")
    ctx = _context(store, tmp_path, _policy())
    for n in range(1, 51):
        _ended(ctx, f"r{n:05d}", RoundState.REJECTED if n % 2 else RoundState.DEPLOYED, with_dir=False)
    redis_client.config_resetstat()
    found = next(r for r in ctx.newest_rounds(page=20) if r.state == RoundState.REJECTED)
    assert found.id == "r00049"
    assert redis_client.info("commandstats")["cmdstat_hmget"]["calls"] == 1  # one page of 20, not 50 records
    assert [r.id for r in ctx.newest_rounds(page=20)] == [f"r{n:05d}" for n in range(50, 0, -1)]


def test_request_results_expire(redis_client: redis_lib.Redis):
    store = RedisStore(redis_client, "keep")
    store.set_request_result("q1", {"round": "r00001"})
    assert store.request_result("q1") == {"round": "r00001"}
    ttls = [redis_client.ttl(k) for k in redis_client.keys("cptd:{keep}:*")]
    assert ttls and all(0 < t <= 24 * 3600 for t in ttls), ttls


# ---------------------------------------------------------------------------------------------- record and API


def test_the_loss_curve_in_the_record_is_bounded_and_spans_the_run(tmp_path: Path):
    store = CancelFlag()
    ctx = job_context(Settings(checkpoint_dir=tmp_path), store)
    rec = bare_record("r00001", RoundState.TRAINING)
    spec = TrainSpec(parent_dir="/p", out_dir=str(tmp_path / "train"), new_path="/n")
    rec.train = TrainRecord(spec=spec, spec_digest="d", out_dir=spec.out_dir, launcher="subprocess")
    (tmp_path / "train").mkdir()
    steps = 5000
    ev = {"event": "step", "loss": 2.0, "lr": 1e-4, "tokens": 0, "tokens_per_s": 1.0}
    lines = [json.dumps({**ev, "step": s, "loss": 2.0 + 1 / s}) for s in range(1, steps + 1)]
    (tmp_path / "train" / "progress.jsonl").write_text("\n".join(lines) + "\n")

    ProgressRecorder(ctx, rec).tick(final=True)

    assert store.record is not None
    curve = store.record["train"]["curve"]
    assert len(curve) <= CURVE_POINTS and len(curve) >= CURVE_POINTS // 2, len(curve)
    assert curve[0][0] == 1 and curve[-1][0] == steps
    gaps = {b[0] - a[0] for a, b in zip(curve[:-2], curve[1:-1], strict=True)}
    assert len(gaps) == 1, gaps  # evenly spread, the newest step aside
    # a resumed trainer repeats steps: the curve keeps one point per step, still bounded
    train = rec.train
    for s in range(steps - 100, steps + 400):
        train.add_curve_point((s, 1.0, 1e-4))
    assert len(train.curve) <= CURVE_POINTS and train.curve[-1][0] == steps + 399
    assert len({c[0] for c in train.curve}) == len(train.curve)


def test_the_manifest_is_paged_and_reads_only_the_page(redis_client: redis_lib.Redis, tmp_path: Path):
    store = RedisStore(redis_client, "keep")
    ctx = _context(store, tmp_path, _policy())
    manifest = tmp_path / "manifest.jsonl"
    rows = [json.dumps({"key": f"k{i}", "offset": i}) for i in range(10)]
    rows[8] = "not JSON: a page before it never parses it"
    manifest.write_text("\n".join(rows) + "\n")
    rec = bare_record("r00001", RoundState.DEPLOYED)
    rec.snapshot = Snapshot(docs=10, train_docs=10, heldout_docs=0, bytes=0, tokens_estimate=0, manifest=str(manifest), manifest_sha256="")
    ctx.put(rec)
    api = TestClient(create_app(_daemon(redis_client, tmp_path)))

    page = api.get("/rounds/r00001/manifest", params={"offset": 3, "limit": 4})

    assert page.status_code == 200 and [m["key"] for m in page.json()] == ["k3", "k4", "k5", "k6"], page.text
    assert api.get("/rounds/r00001/manifest", params={"limit": 10**6}).status_code == 422
    assert api.get("/rounds", params={"limit": 10**6}).status_code == 422


def _daemon(redis_client: redis_lib.Redis, tmp_path: Path) -> Daemon:
    kw = redis_client.connection_pool.connection_kwargs
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: keep\n")
    settings = Settings(redis_url=f"redis://{kw['host']}:{kw['port']}/0", checkpoint_dir=tmp_path / "ck", policy=policy, vllm_urls="")
    return Daemon(Policy(name="keep"), settings)


# ---------------------------------------------------------------------------------------------- optimizer state


def test_an_evaluated_round_drops_its_checkpoints_optimizer_state(redis_client: redis_lib.Redis, tmp_path: Path):
    """Once the gate has decided, the round trains no more: its checkpoints keep their weights and masters (the
    chosen one is deployed as it is) and lose their optimizer state, most of their bytes; the main line keeps its
    own, which the next round continues from. The evaluator's report is already written: no job runs."""
    from daemon.jobs.specs import EvalReport, LossSummary, ModelReport, TrainResult
    from daemon.rounds.evaluating import evaluating

    ctx = _context(RedisStore(redis_client, "optim"), tmp_path, _policy())
    out = ctx.round_dir("r00001") / "train"
    layouts = {
        "step-00000004": "resume/optimizer.pt",
        "step-00000008": "resume/optim/__0_0.distcp",
        "../mainline": "resume/optim/__0_0.distcp",
    }
    for name, optim in layouts.items():
        d = out / "checkpoints" / name
        (d / optim).parent.mkdir(parents=True, exist_ok=True)
        (d / optim).write_bytes(b"o" * 4096)
        (d / "model.safetensors").write_bytes(b"w")
        (d / "resume" / "dcp").mkdir(parents=True, exist_ok=True)
        (d / "resume" / "dcp" / "__0_0.distcp").write_bytes(b"m")
    rec = bare_record("r00001", RoundState.EVALUATING)
    rec.policy = ctx.get_policy()
    rec.parent = Parent(version="base", checkpoint=str(tmp_path / "base"))
    spec = TrainSpec(parent_dir=str(tmp_path / "base"), out_dir=str(out), new_path=str(tmp_path / "new.jsonl"))
    result = TrainResult(steps=8, final=str(out / "final"), mainline=str(out / "mainline"))
    rec.train = TrainRecord(spec=spec, spec_digest=spec.digest(), out_dir=str(out), launcher="subprocess", result=result)

    def scored(name: str, nll: float) -> ModelReport:
        return ModelReport(name=name, path=name, new=LossSummary(nll, 1.0, 100), replay=LossSummary(2.0, 1.0, 100))

    report = EvalReport("r00001", scored("serving", 3.0), [scored("step-00000004", 2.5), scored("final", 2.4)])
    (ctx.round_dir("r00001") / "eval_report.json").write_text(report.to_json())
    ctx.put(rec)
    evaluating(ctx, rec)
    assert rec.gate is not None and rec.state in (RoundState.DEPLOYING, RoundState.REJECTED)
    for name, optim in layouts.items():
        d = out / "checkpoints" / name
        assert (d / "model.safetensors").exists() and (d / "resume" / "dcp" / "__0_0.distcp").exists(), name
        assert (d / optim).exists() == (name == "../mainline"), name
