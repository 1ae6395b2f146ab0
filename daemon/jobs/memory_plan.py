"""The memory plan of a round: `python -m daemon.jobs.memory_plan SPEC.json` (what `cptd plan` runs).

Why: the CPU tests train a 98M model with grad_accum 1; what an 8B or 70B round
needs per GPU cannot be seen there, and no GPU may be lent to find out. So the
plan runs the trainer's own code, not a formula: the model is built from its
config.json on the meta device, sharded by daemon/jobs/sharding.py exactly as a
round shards it, and one training step (the trainer's micro_batch_loss and
optimizer_step, with the policy's micro-batch, sequence length, accumulation,
precision, activation checkpointing and LoRA) and one evaluation step
(lm_loss.window_nll) run under torch's FakeTensorMode on a fake process group
of N ranks. torch's memory tracker (torch.distributed._tools, as torchtitan's
estimation does) records what each rank's allocator would hold. The host and
volume figures follow from the shapes and the trainer's load, export and
checkpoint layout, as the code is today (docs/round-engine.md, Memory plan).

With `real: true` the same step runs on real tensors on the ranks torchrun
started (gloo, CPU): the check that the fake plan predicts a real run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from daemon.jobs import sharding
from daemon.jobs.lm_loss import window_nll
from daemon.jobs.model_loader import DTYPES
from daemon.jobs.specs import PlanResult, PlanSpec, write_result
from daemon.jobs.trainer import (
    gradient_sync,
    make_optimizer,
    micro_batch_loss,
    optimizer_step,
    peak_memory,
    release_freed_host_memory,
    reset_peak_memory,
)
from policies.train import MIXED, resolve_precision

GiB = 2**30
# The tracker's categories, by enum name (FSDPMemTracker's, then MemTracker's), in the plan's five columns.
COLUMNS = {
    "parameters": ("SHARDED_PARAM", "UNSHARDED_PARAM", "BUFFER", "PARAM"),
    "gradients": ("SHARDED_GRAD", "UNSHARDED_GRAD", "GRAD"),
    "optimizer": ("OPT",),
    "activations": ("ACT", "INP"),
    "temporaries": ("TEMP", "ALL_GATHER", "REDUCE_SCATTER", "OTH"),
}


def parent_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"model config: dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_model(spec: PlanSpec, param_dtype: torch.dtype, device: torch.device) -> Any:  # a PreTrainedModel or PeftModel
    """The model a round trains: full weights in param_dtype, or a LoRA adapter (param_dtype) on a frozen base in the
    parent's dtype, as trainer.load_model makes it. Random weights: the plan needs shapes, not values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tp = spec.train
    cfg_dict = dict(spec.model_shape)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    dtype = param_dtype if tp.mode == "full" else parent_dtype(spec.model_shape)
    with device:
        model: Any = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        if tp.mode != "full":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=tp.lora_r, lora_alpha=tp.lora_alpha, lora_dropout=tp.lora_dropout, target_modules=list(tp.lora_targets))
            model = get_peft_model(model, lora)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(param_dtype)
    model.config.use_cache = False
    model.train()
    return model


def accumulated_grad_bytes(model: torch.nn.Module) -> int:
    """Bytes of the unsharded gradients FSDP2 keeps between micro-batches when gradient sync is off (0 since the
    trainer reduce-scatters every micro-batch; the plan would show a return of issue 23's whole gradients)."""
    total = 0
    for m in model.modules():
        group = getattr(m, "_get_fsdp_state", None) and m._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
        for fp in group.fsdp_params if group else ():
            g = getattr(fp, "unsharded_accumulated_grad", None)
            if g is not None:
                total += g.numel() * g.element_size()
    return total


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Meta parameters and buffers to (fake) tensors on `device`, shared ones (tied embeddings) staying shared.
    Not Module.to_empty: it swaps fake parameters in place, which torch refuses while the fake mode holds a weakref."""
    made: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        slots: tuple[dict[str, Any], ...] = (mod._parameters, mod._buffers)
        for slot in slots:
            for name, t in slot.items():
                if t is not None and t.is_meta:
                    if id(t) not in made:
                        new = torch.empty_like(t, device=device)
                        made[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
                    slot[name] = made[id(t)]


def columns(snapshot: dict) -> dict[str, int]:
    """The tracker's peak snapshot (one device) in the plan's five columns."""
    (per_device,) = snapshot.values()
    named = {k.name: int(v) for k, v in per_device.items() if k != "Total"}
    return {col: sum(named.get(n, 0) for n in names) for col, names in COLUMNS.items()}


def tracker(model: torch.nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> Any:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class GlobalPeak(MemTracker):
        """Only the whole rank's peak, which is all the plan reads (get_tracker_snapshot("peak")). The tracker also
        keeps every active module's own peak, walking all modules after every op: for an 8B model that walk was most
        of the plan's time (PENDING runs the plan, tests/test_memory_plan.py runs it on the 8B shape)."""

        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    class FSDPGlobalPeak(FSDPMemTracker):
        _update_peak_stats = GlobalPeak._update_peak_stats

    class FrozenAware(GlobalPeak):
        """MemTracker hooks every parameter's gradient, and torch refuses a hook on a frozen one (LoRA's base): a
        module with frozen parameters is tracked without the hooks; its gradients (the adapter's) are still counted
        where the tracker meets them on the parameters (as gradients) or in flight (as temporaries)."""

        def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True) -> Any:
            hooks = install_grad_hooks and all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks=hooks)

    if fsdp:
        return FSDPGlobalPeak(mod=model, optm=opt)
    t = FrozenAware()
    t.track_external(model, opt)
    return t


def rss() -> int:
    """This process's resident set now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_step(spec: PlanSpec, world: int, fake: bool) -> dict[str, Any]:
    """One optimizer step and one evaluation step under the memory tracker; the device figures of the plan."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tp = spec.train
    fsdp = world > 1 and tp.parallelism == "fsdp"
    # The mesh holds real rank lists: made before the fake mode, which would turn them into fake tensors.
    mesh = None
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    dtype = str(parent_dtype(spec.model_shape)).removeprefix("torch.")
    precision = resolve_precision(tp.precision, dtype, "cpu" if not fake else "cuda", "fsdp" if fsdp else "ddp")
    param_dtype = torch.bfloat16 if precision == "bf16-params" else torch.float32
    amp_dtype = DTYPES[MIXED[precision]] if precision in MIXED else None
    cpu = torch.device("cpu")
    with FakeTensorMode() if fake else nullcontext():
        # Fake: built on the meta device and materialised as fake tensors (fsdp: after sharding, as torchtitan does).
        model = build_model(spec, param_dtype, torch.device("meta") if fake else cpu)
        if tp.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fsdp:
            sharding.shard(model, amp_dtype, tp.cpu_offload, mesh=mesh)
        if fake and fsdp:
            model.to_empty(device=cpu)
        elif fake:
            materialise(model, cpu)
        opt = make_optimizer(model, tp, cpu)
        params = [p for p in model.parameters() if p.requires_grad]
        vocab = int(spec.model_shape["vocab_size"])
        x = torch.randint(0, vocab, (tp.micro_batch_size, tp.seq_len))
        pos = torch.arange(tp.seq_len).expand(tp.micro_batch_size, tp.seq_len)
        n_tgt = tp.micro_batch_size * (tp.seq_len - 1) * tp.grad_accum

        def autocast() -> Any:  # as the trainer: fsdp casts through its MixedPrecisionPolicy instead
            return torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None and not fsdp else nullcontext()

        def step(micro_batches: int) -> int:
            """The trainer's step; returns the most gradient bytes fsdp held unsharded between micro-batches."""
            held = 0
            for m in range(micro_batches):
                with gradient_sync(model, False, last=m == micro_batches - 1):  # the trainer's; no DDP reducer here
                    with autocast():
                        loss = micro_batch_loss(model, x, pos, x)
                    (loss / n_tgt).backward()
                held = max(held, accumulated_grad_bytes(model))
                t.reset_mod_stats()  # the tracker takes one forward per module per context otherwise
            optimizer_step(opt, params, None, tp.grad_clip)
            return held

        # The first step makes the optimizer state, under a tracker of its own: FSDPMemTracker counts AdamW's new
        # DTensor moments once at their global size there (a whole fp32 model, gone at once; not what the
        # allocator holds). The second step is the steady state, and the plan. Micro-batches after its second hold
        # nothing more: each reduce-scatters into the same sharded gradients.
        with tracker(model, opt, fsdp) as t:
            step(1)
        base_rss = rss()
        reset_peak_memory(cpu)
        t = tracker(model, opt, fsdp)
        if fsdp:
            t.track_inputs((x, pos))
        with t:
            held = step(min(tp.grad_accum, 2))
        train = columns(t.get_tracker_snapshot("peak"))
        rss_delta = int(peak_memory(cpu).get("peak_memory_mb", 0) * 2**20) - base_rss
        model.eval()
        e = tracker(model, opt, fsdp)
        with e, torch.no_grad(), autocast():
            inp = torch.randint(0, vocab, (spec.eval_batch_size, tp.seq_len))
            window_nll(model, inp, torch.ones_like(inp))
        eval_peak = sum(columns(e.get_tracker_snapshot("peak")).values())
        n_params = sum(p.numel() for p in model.parameters())  # a DTensor counts its whole tensor
        n_train = sum(p.numel() for p in params)
    # fsdp's unsharded accumulated gradients are plain tensors to the tracker (temporaries): they are gradients.
    moved = min(held, train["temporaries"])
    train["gradients"] += moved
    train["temporaries"] -= moved
    return {
        **train,
        "accumulated_gradients": moved,
        "eval_peak": eval_peak,
        "rss_delta": rss_delta if not fake else None,
        "fsdp": fsdp,
        "precision": precision,
        "param_dtype": param_dtype,
        "parameters_total": n_params,
        "trainable_total": n_train,
    }


def storage_figures(spec: PlanSpec, m: dict[str, Any]) -> dict[str, int]:
    """Host memory at load and export, bytes written per checkpoint and per round: from the shapes and the trainer's
    code as it is (trainer.model_for_round, save_sharded_state / save_state, export_weights)."""
    tp = spec.train
    n, t = m["parameters_total"], m["trainable_total"]
    pb = torch.finfo(m["param_dtype"]).bits // 8
    out_b = torch.finfo(parent_dtype(spec.model_shape)).bits // 8
    full = tp.mode == "full"
    sharded = full and m["fsdp"]
    world = spec.gpus
    # fsdp, full weights: built on the meta device, sharded, each rank reads only its rows (its shard, in the trainable
    # dtype). Otherwise every rank builds the whole model in host memory, then moves it to its GPU whole.
    loaded = n * pb // world if sharded else n * pb if full else (n - t) * out_b + t * pb
    weights_out = (n if full else t) * out_b  # the consolidated weights or adapter, in the parent's dtype
    # fsdp, full: each rank writes its rows one tensor at a time (the largest: the embedding's shard, in the parent's
    # dtype); LoRA: rank 0 gathers the adapter and writes a copy; one replica: a parent-dtype copy of the weights.
    largest = int(spec.model_shape.get("vocab_size", 0)) * int(spec.model_shape.get("hidden_size", 0)) * out_b // world
    export = largest if sharded else t * pb + weights_out if m["fsdp"] else weights_out
    masters = t * pb if (m["fsdp"] or pb != out_b) else 0  # DCP's fp32 shards, or master_weights.safetensors
    ckpt = weights_out + masters + 2 * 4 * t  # the newest checkpoint: AdamW's two fp32 moments too
    older = weights_out + masters  # older kept checkpoints drop their optimizer state
    steps = spec.steps or tp.max_steps or tp.checkpoint_interval
    n_ckpt = math.ceil(steps / tp.checkpoint_interval)
    mainline = ckpt if spec.schedule_kind == "infinite" else 0
    return {
        "device_at_load": loaded,
        "host_load_per_rank": loaded,
        "host_export_rank0": export,
        "checkpoint_bytes": ckpt,
        "final_bytes": weights_out,
        "round_written_bytes": n_ckpt * ckpt + mainline + weights_out,
        "round_held_bytes": ckpt + (min(n_ckpt, tp.keep_checkpoints) - 1) * older + mainline + weights_out,
        "staged_bytes": weights_out + mainline,  # the parent is in the dtype the candidate is written in
        "published_bytes": weights_out + mainline,
        "checkpoints_per_round": n_ckpt,
        "steps": steps,
    }


def refusals(spec: PlanSpec, r: dict[str, Any]) -> list[str]:
    """Why the round does not fit what was declared, each with its numbers; empty when it fits."""
    out = []
    per_node = math.ceil(spec.gpus / spec.nodes)
    if spec.gpu_memory_gb is not None:
        cap = spec.gpu_memory_gb * GiB
        if r["peak"] > cap:
            out.append(f"training step peaks at {r['peak'] / GiB:.1f} GiB per GPU, over the declared {spec.gpu_memory_gb:g} GiB")
        if r["eval_peak"] > cap:
            out.append(f"evaluation step peaks at {r['eval_peak'] / GiB:.1f} GiB per GPU, over the declared {spec.gpu_memory_gb:g} GiB")
        if r["device_at_load"] > cap:
            out.append(
                f"each rank moves {'its shard' if r['device_at_load'] < r['final_bytes'] else 'the whole model'} "
                f"({r['device_at_load'] / GiB:.1f} GiB) to its GPU at load, over the declared {spec.gpu_memory_gb:g} GiB"
            )
    if spec.host_memory_gb is not None:
        cap = spec.host_memory_gb * GiB
        if per_node * r["host_load_per_rank"] > cap:
            out.append(
                f"load: {per_node} ranks per node each hold {r['host_load_per_rank'] / GiB:.1f} GiB, "
                f"{per_node * r['host_load_per_rank'] / GiB:.1f} GiB over the declared {spec.host_memory_gb:g} GiB host memory"
            )
        if r["host_export_rank0"] > cap:
            out.append(f"export: rank 0 holds {r['host_export_rank0'] / GiB:.1f} GiB, over the declared {spec.host_memory_gb:g} GiB")
    if spec.volume_gb is not None and r["round_held_bytes"] > spec.volume_gb * GiB:
        held = r["round_held_bytes"] / GiB
        out.append(f"a round holds {held:.1f} GiB of checkpoints at once, over the declared {spec.volume_gb:g} GiB volume")
    return out


def plan(spec: PlanSpec) -> PlanResult:
    """The plan of one round; in real mode, run on every rank (torchrun), the measurement of rank 0's."""
    t0 = time.perf_counter()
    tp = spec.train
    if tp.mode == "qlora":
        raise ValueError("train.mode qlora: the 4-bit base (bitsandbytes) cannot be built on fake tensors; plan it as lora")
    if tp.cpu_offload and spec.gpus == 1:
        raise ValueError("train.cpu_offload with one GPU: offloading is FSDP's, and one rank is not sharded; the trainer refuses it")
    if spec.nodes > spec.gpus:
        raise ValueError(f"{spec.nodes} nodes for {spec.gpus} GPUs: every node needs at least one")
    world = spec.gpus
    if spec.real:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != spec.gpus:
            raise ValueError(f"real: the spec plans {spec.gpus} ranks and torchrun started {world}")
        if world > 1:
            dist.init_process_group("gloo")
        release_freed_host_memory()  # as the trainer on CPU: freed tensors leave the resident set, so it measures
    elif world > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        m = measure_step(spec, world, fake=not spec.real)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    cols = {k: m[k] for k in COLUMNS}
    r: dict[str, Any] = {**cols, "peak": sum(cols.values()), "eval_peak": m["eval_peak"], **storage_figures(spec, m)}
    return PlanResult(
        world=world,
        nodes=spec.nodes,
        fsdp=m["fsdp"],
        precision=m["precision"],
        mode="real" if spec.real else "fake",
        parameters_total=m["parameters_total"],
        trainable_total=m["trainable_total"],
        accumulated_gradients=m["accumulated_gradients"],
        refusals=refusals(spec, r),
        rss_delta=m["rss_delta"],
        seconds=round(time.perf_counter() - t0, 1),
        **r,
    )


def table(spec: PlanSpec, r: PlanResult) -> str:
    """The plan for people: per rank, GiB."""

    def g(x: int) -> str:
        return f"{x / GiB:,.2f}"

    tp = spec.train
    rows = [
        f"model       {r.parameters_total / 1e9:.2f} B parameters ({r.trainable_total / 1e9:.3g} B trainable), {tp.mode}, "
        f"{r.precision}, {'fsdp' if r.fsdp else 'one replica per rank'} on {r.world} ranks / {r.nodes} node(s) [{r.mode}]",
        f"step        micro-batch {tp.micro_batch_size} x {tp.seq_len}, grad_accum {tp.grad_accum}, "
        f"activation checkpointing {'on' if tp.activation_checkpointing else 'off'}",
        "per rank (GiB)",
        f"  peak device memory, training step  {g(r.peak)}",
        f"    parameters                       {g(r.parameters)}",
        f"    gradients                        {g(r.gradients)}"
        + (f"   (of which {g(r.accumulated_gradients)} unsharded, kept through accumulation)" if r.accumulated_gradients else ""),
        f"    optimizer state                  {g(r.optimizer)}",
        f"    activations                      {g(r.activations)}",
        f"    temporaries                      {g(r.temporaries)}",
        f"  peak device memory, evaluation     {g(r.eval_peak)}",
        f"  device memory at load              {g(r.device_at_load)}",
        f"  host memory at load                {g(r.host_load_per_rank)}   (x {math.ceil(r.world / r.nodes)} ranks per node)",
        f"  host memory at export (rank 0)     {g(r.host_export_rank0)}",
        "volume (GiB)",
        f"  per checkpoint                     {g(r.checkpoint_bytes)}",
        f"  written per round                  {g(r.round_written_bytes)}   "
        f"({r.checkpoints_per_round} checkpoint(s) over {r.steps} steps, and the candidate)",
        f"  held at once by a round            {g(r.round_held_bytes)}   (optimizer state in the newest checkpoint only)",
        "object storage (GiB, CPTD_CHECKPOINT_URL)",
        f"  staged in scratch besides that     {g(r.staged_bytes)}   (the parent"
        + (" and the main line)" if r.staged_bytes > r.final_bytes else ")"),
        f"  uploaded per accepted round        {g(r.published_bytes)}",
    ]
    if r.rss_delta is not None:
        rows.append(f"measured    resident set growth over the step {g(r.rss_delta)} GiB")
    rows += [f"DOES NOT FIT: {why}" for why in r.refusals] or ["fits what was declared"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.memory_plan SPEC.json")
    spec = PlanSpec.read(argv[0])
    result = plan(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        write_result(spec.result_file, result.model_dump())
        print(table(spec, result), flush=True)


if __name__ == "__main__":
    main()
