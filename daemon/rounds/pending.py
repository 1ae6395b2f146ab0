"""PENDING: refuse a round that could not finish or deploy, before it moves a document or trains a step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from connectors.object_store import is_object_url, join
from daemon.job_launchers import Job
from daemon.jobs.specs import DeviceCheckSpec
from daemon.round_record import RoundRecord, RoundState
from daemon.rounds import staging
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed
from daemon.rounds.memory_fit import memory_refusal
from policies.config import Policy
from policies.round_policy import GB, disk_refusal, round_disk_bytes

PARAM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # config.json's dtype -> bytes per parameter


def pending(ctx: RoundContext, rec: RoundRecord) -> None:
    policy = ctx.policy_of(rec)
    refusal = space_refusal(ctx, policy, rec) or refusal_of(ctx, policy, rec) or memory_refusal(ctx, policy, rec)
    if refusal:
        raise RoundFailed(f"PENDING: refused before taking any document: {refusal}", requeue=True)
    ctx.enter(rec, RoundState.SNAPSHOT)


def space_refusal(ctx: RoundContext, policy: Policy, rec: RoundRecord) -> str | None:
    """A round that fills the checkpoint volume fails hours later, mid-checkpoint: refuse it now, naming needed vs free.

    Needed is `rounds.min_free_gb` when set, else the estimate of policies.round_policy.round_disk_bytes from the
    parent checkpoint's size and dtype, measured here (policies/ reads no disk)."""
    ctx.settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ctx.settings.checkpoint_dir).free
    if policy.rounds.min_free_gb is not None:
        return disk_refusal(free, round(policy.rounds.min_free_gb * GB))
    weights, config = parent_size(ctx, rec.parent.checkpoint)
    hidden = config.get("hidden_size") or 0
    needed = round_disk_bytes(
        parent_bytes=weights,
        param_bytes=PARAM_BYTES.get(config.get("torch_dtype") or config.get("dtype") or "", 2),  # unknown: 2, the larger estimate
        mode=policy.train.mode,
        keep_checkpoints=policy.train.keep_checkpoints,
        mainline=policy.schedule.kind == "infinite",
        data_bytes=3 * round(policy.rounds.budget_tokens * policy.rounds.bytes_per_token),  # new + held out + replay files
        adapter_fraction=min(1.0, 2 * policy.train.lora_r / hidden) if hidden else 1.0,
        staged=ctx.settings.checkpoint_url is not None,
    )
    return disk_refusal(free, needed)


def parent_size(ctx: RoundContext, ref: str | None) -> tuple[int, dict]:
    """The parent's safetensors bytes and its config.json, from the volume or from object storage (a listing and
    one small read: nothing is downloaded to size a round)."""
    if ref and is_object_url(ref):
        store = staging.objects(ctx)
        assert store is not None
        weights = sum(n for rel, n in store.objects(ref) if "/" not in rel and rel.endswith(".safetensors"))
        raw = store.read(join(ref, "config.json")) if store.size(join(ref, "config.json")) is not None else b"{}"
        return weights, json.loads(raw)
    parent = Path(ref) if ref else None
    weights = sum(f.stat().st_size for f in parent.glob("*.safetensors")) if parent and parent.is_dir() else 0
    config = json.loads((parent / "config.json").read_text()) if parent and (parent / "config.json").is_file() else {}
    return weights, config


def refusal_of(ctx: RoundContext, policy: Policy, rec: RoundRecord) -> str | None:
    """Why this round cannot deploy: an adapter every replica cannot take, or 4-bit that the trainer cannot run."""
    train = policy.train
    if train.mode == "full":
        return None
    assert ctx.serving is not None
    why = ctx.serving.lora_refusal(train.lora_r)
    if why:
        return f"train.mode {train.mode} needs every replica to take a rank-{train.lora_r} adapter: {why}"
    if train.mode == "qlora":
        directory = ctx.round_dir(rec.id)
        directory.mkdir(parents=True, exist_ok=True)
        spec = DeviceCheckSpec(device=train.device, out=str(directory / "device-check.json"))
        try:
            job = Job(spec, directory / "device-check-spec.json", directory / "device-check.log", round_id=rec.id)
            out = ctx.run_job(job, rec, timeout=300)
        except Cancelled:
            raise
        except RoundFailed as e:
            return f"train.mode qlora: the 4-bit check failed: {e.cause[-300:]}"
        if out["refusal"]:
            return f"train.mode qlora on {out['device']}: {out['refusal']}"
    return None
