"""PENDING's memory check: the round's memory plan against the GPU (and host) memory the operator declared.

Why: a round that does not fit its GPUs fails with an out-of-memory error
minutes or hours after it took its documents and its GPUs. When the operator
declares what each GPU holds (CPTD_TRAIN_GPU_MEMORY_GB, and per node
CPTD_TRAIN_HOST_MEMORY_GB), PENDING runs the memory plan (daemon/jobs/memory_plan.py,
what `cptd plan` runs) for the parent checkpoint's config.json, the round's
train policy and the launcher's ranks, and refuses the round with the figures.
The plan is a job (the daemon never imports torch) and takes minutes for a
large model on fake tensors, so its result is kept in CHECKPOINT_DIR/plans/
under a hash of everything it depends on: the next round with the same
parent shape, train policy, ranks and declaration reads it instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from daemon.job_launchers import Job, JobStartError, train_ranks
from daemon.jobs.specs import PlanResult, PlanSpec
from daemon.round_record import RoundRecord
from daemon.rounds.context import Cancelled, RoundContext, RoundFailed, write_atomic
from policies.config import Policy

log = logging.getLogger("cptd.rounds")

GiB = 2**30
PLAN_TIMEOUT_S = 1800.0  # an 8B plan takes minutes on a busy CPU; a 70B one on 16 ranks longer
COLUMNS = ("parameters", "gradients", "optimizer", "activations", "temporaries")
# What to change when a column is the largest part of the training step's peak.
KNOBS = {
    "parameters": "shard over more GPUs (train.parallelism fsdp with more ranks: CPTD_TRAIN_LAUNCHER=torchrun:N or the job "
    "template's GPUs), or train.mode lora",
    "gradients": "shard over more GPUs (train.parallelism fsdp with more ranks), or train.mode lora",
    "optimizer": "shard over more GPUs (train.parallelism fsdp with more ranks), train.cpu_offload, or train.mode lora",
    "activations": "train.activation_checkpointing true, or a smaller train.micro_batch_size or train.seq_len",
    "temporaries": "a smaller train.micro_batch_size or train.seq_len",
}
# When the steps fit and the load or export does not: fsdp loads and exports full weights a shard per rank, one
# replica (and LoRA's base) the whole model.
LOAD_KNOB = (
    "train.parallelism fsdp on more ranks (full weights load and export a shard per rank), train.mode lora, or more memory "
    "per GPU or node (docs/round-engine.md, Memory plan)"
)


# The code the plan's figures come from: a new version of any of them plans again instead of reading an old result.
PLAN_CODE = ("memory_plan.py", "trainer.py", "sharding.py", "lm_loss.py")


def plan_key(shape: dict[str, Any], spec: PlanSpec) -> str:
    """The hash the cached plan is filed under: the parent's shape, the train policy, ranks, nodes, the declaration
    and the plan's code."""
    jobs = Path(__file__).parent.parent / "jobs"
    what = {
        "code": [hashlib.sha256((jobs / name).read_bytes()).hexdigest() for name in PLAN_CODE],
        "shape": shape,
        "train": spec.train.model_dump(mode="json"),
        "schedule": spec.schedule_kind,
        "gpus": spec.gpus,
        "nodes": spec.nodes,
        "gpu_memory_gb": spec.gpu_memory_gb,
        "host_memory_gb": spec.host_memory_gb,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def memory_refusal(ctx: RoundContext, policy: Policy, rec: RoundRecord) -> str | None:
    """Why the round does not fit the declared memory, with the plan's figures and the knob to change; None when it
    fits or nothing is declared (no plan runs then)."""
    s = ctx.settings
    if s.train_gpu_memory_gb is None:
        return None
    train = policy.train
    if train.mode == "qlora":  # the plan cannot build a 4-bit base; planned as lora it would overstate the base 4x
        log.warning("memory plan skipped: train.mode qlora cannot be planned", extra={"round_id": rec.id})
        return None
    config = Path(rec.parent.checkpoint) / "config.json" if rec.parent.checkpoint else None
    if config is None or not config.is_file():
        return f"CPTD_TRAIN_GPU_MEMORY_GB is set and the memory plan needs the parent's config.json: {config or 'no parent checkpoint'}"
    try:
        shape = json.loads(config.read_text())
        gpus, nodes = train_ranks(s, ctx.kube_api_client)
    except (OSError, ValueError) as e:
        return f"memory plan: {config} is not a readable config.json ({e})"
    except JobStartError as e:
        return f"memory plan: the trainer's ranks are unknown: {e}"
    directory = ctx.round_dir(rec.id)
    directory.mkdir(parents=True, exist_ok=True)
    spec = PlanSpec(
        model_shape=shape,
        train=train,
        schedule_kind=policy.schedule.kind,
        gpus=gpus,
        nodes=nodes,
        gpu_memory_gb=s.train_gpu_memory_gb,
        host_memory_gb=s.train_host_memory_gb,
        out=str(directory / "memory-plan.json"),
    )
    cached = s.checkpoint_dir / "plans" / f"{plan_key(shape, spec)}.json"
    if cached.is_file():
        result = PlanResult.model_validate_json(cached.read_text())
    else:
        try:
            out = ctx.run_job(Job(spec, directory / "memory-plan-spec.json", directory / "memory-plan.log"), rec, timeout=PLAN_TIMEOUT_S)
        except Cancelled:
            raise
        except RoundFailed as e:
            return f"the memory plan failed (unset CPTD_TRAIN_GPU_MEMORY_GB to skip it): {e.cause[-300:]}"
        result = PlanResult.model_validate(out)
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, result.model_dump_json().encode())
        prune_plans(cached.parent)
    log.info("memory plan", extra={"round_id": rec.id, "peak_gib": round(result.peak / GiB, 2), "fits": not result.refusals})
    return fit_refusal(result, s.train_gpu_memory_gb)


KEEP_PLANS = 32  # distinct (shape, train section, ranks, declaration, code) combinations worth remembering


def prune_plans(directory: Path, keep: int = KEEP_PLANS) -> None:
    """The plan cache stays bounded: every policy edit, new parent shape or new version of the plan's code adds a
    key, and only the newest few are ever asked again."""
    plans = sorted(directory.glob("*.json"), key=lambda f: f.stat().st_mtime_ns)
    for old in plans[: max(len(plans) - keep, 0)]:
        old.unlink(missing_ok=True)


def fit_refusal(r: PlanResult, gpu_memory_gb: float) -> str | None:
    """The plan's refusals, the step's peak against the declaration, its largest part and what to change."""
    if not r.refusals:
        return None
    main = max(COLUMNS, key=lambda c: getattr(r, c))
    steps_fit = max(r.peak, r.eval_peak) <= gpu_memory_gb * GiB
    knob = LOAD_KNOB if steps_fit else KNOBS[main]
    return (
        f"the memory plan ({r.parameters_total / 1e9:.2f} B parameters, {r.world} rank(s), {r.precision}) does not fit "
        f"CPTD_TRAIN_GPU_MEMORY_GB={gpu_memory_gb:g}: peak {r.peak / GiB:.1f} GiB per GPU against {gpu_memory_gb:g} GiB declared, "
        f"{main} {getattr(r, main) / GiB:.1f} GiB the largest part; {'; '.join(r.refusals)}. Change: {knob}"
    )
