"""One CPT round: `python -m daemon.jobs.trainer SPEC.json` (or `torchrun --nproc-per-node N -m daemon.jobs.trainer SPEC.json`).

The daemon writes a TrainSpec, runs this in a child process so a crash or OOM
never takes the daemon down, and follows OUT/progress.jsonl (also echoed on
stdout). The trainer never talks to Redis or Kafka: its whole input is the spec
and the files it names, so a rerun of the same spec is the same round. Killed
at any step, a rerun resumes from the newest complete checkpoint and ends with
the same weights as an uninterrupted run: the data order is a pure function of
(data_seed, step) and the schedule a pure function of the step.

Output layout (OUT = spec.out_dir):
  spec.json              the spec this directory belongs to (a different spec is refused)
  progress.jsonl         start / eval / step / checkpoint / mainline / done events
  checkpoints/step-N/    resumable state after N steps: weights in the parent's dtype (safetensors; full:
                         HF dir with tokenizer and the parent's config.json, lora/qlora: adapter),
                         resume/master_weights.safetensors (fp32 trainable weights, when rounded), resume/optimizer.pt
                         (newest checkpoint only), trainer_state.pt (grad scaler, RNG), state.json; fsdp: resume/dcp
                         (fp32 masters), resume/optim (newest only), weights written row-wise by every rank
  mainline/              infinite only: main-line state at the end of this round's main-line
                         steps, same format; the next round's spec names it as mainline_in
  final/                 the release candidate (infinite: the end of the anneal branch), in the parent's
                         dtype; full: HF dir (model.safetensors, the parent's config.json, tokenizer),
                         lora: adapter_config.json + adapter_model.safetensors (vLLM LoRA layout)
  result.json            written last; its presence means the round finished

Packing and the documents' order: daemon/jobs/token_blocks.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from daemon.jobs.lm_loss import IGNORE, mean_token_loss, token_nll
from daemon.jobs.model_loader import DTYPES, checkpoint_dtype, dtype_name, load_causal_lm, load_tokenizer, resolve_device
from daemon.jobs.specs import OPTIMIZER_STATE, TrainSpec, drop_optimizer_state, read_texts, write_result
from daemon.jobs.token_blocks import blocks_at, mix_documents, pack, tokenize_docs
from policies.lr_schedule import anneal_steps_for, round_lr
from policies.train import MIXED, TrainPolicy, resolve_compile, resolve_precision

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

# fp32 trainable parameters, when the written weights are rounded. In a subdirectory: a mid-round checkpoint the gate
# picks is deployed as it is, and vLLM (and the swap's validation) read every *.safetensors at the top of the directory.
MASTER_FILE = "resume/master_weights.safetensors"
OPTIMIZER_FILE = OPTIMIZER_STATE[1]  # one replica's optimizer state (specs.drop_optimizer_state removes it)
# The parent's own files a full checkpoint carries byte for byte: the swap compares config and tokenizer with the served ones.
PARENT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


# ---------------------------------------------------------------- model + state


def load_model(
    spec: TrainSpec, train_policy: TrainPolicy, state_dir: str | None, device: torch.device, param_dtype: torch.dtype, meta: bool = False
):
    """Parent weights, or those saved in state_dir (a checkpoint or main line), with trainable parameters in param_dtype.
    lora/qlora: an adapter on the parent, frozen in its own dtype (or 4-bit). `meta`: see model_for_round."""
    attn = spec.attn_implementation
    if attn == "auto":
        # flex builds a sparse block mask from the per-document positions; sdpa would need a dense mask
        # (H100, 0.5B: 18% vs 34% MFU compiled)
        attn = ("flash_attention_2" if _has_flash_attn() else "flex_attention") if device.type == "cuda" else "sdpa"
    if train_policy.mode == "full" and meta:
        from transformers import AutoConfig, AutoModelForCausalLM

        from daemon.jobs import sharding

        with sharding.parameters_on_meta():
            cfg = AutoConfig.from_pretrained(spec.parent_dir)
            model = AutoModelForCausalLM.from_config(cfg, dtype=param_dtype, attn_implementation=attn).train()
    elif train_policy.mode == "full":
        model = load_causal_lm(state_dir or spec.parent_dir, device=device, dtype=param_dtype, attn_implementation=attn).train()
    else:
        quantize = "nf4" if train_policy.mode == "qlora" else None
        adapter = state_dir or _continuable_adapter(spec.adapter_in, train_policy)
        if adapter:
            model = load_causal_lm(
                spec.parent_dir, device=device, adapter=adapter, trainable_adapter=True, quantize=quantize, attn_implementation=attn
            )
        else:
            from peft import LoraConfig, get_peft_model

            base = load_causal_lm(spec.parent_dir, device=device, quantize=quantize, attn_implementation=attn)
            torch.manual_seed(spec.init_seed)
            cfg = LoraConfig(
                r=train_policy.lora_r,
                lora_alpha=train_policy.lora_alpha,
                lora_dropout=train_policy.lora_dropout,
                target_modules=list(train_policy.lora_targets),
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(base, cfg)  # peft keeps the adapter in fp32 over a bf16/fp16/4-bit base
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(param_dtype)
        model.train()
    if state_dir and (Path(state_dir) / MASTER_FILE).exists():  # exact resume: the fp32 masters, not the rounded weights
        from safetensors.torch import load_file

        masters = load_file(str(Path(state_dir) / MASTER_FILE))
        named = dict(model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in masters]
        if missing:
            raise RuntimeError(f"{state_dir}/{MASTER_FILE} lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for n, t in masters.items():
                named[n].copy_(t)
    model.config.use_cache = False
    return model


def model_for_round(spec: TrainSpec, train_policy: TrainPolicy, state_dir: str | None, device, param_dtype, amp_dtype, fsdp: bool):
    """The model a round trains (fsdp: sharded). Full weights under fsdp are never whole on a rank: built on the meta
    device, sharded, then each rank reads only its rows of the parent (host memory at load: its shard, issue 23)."""
    meta = fsdp and train_policy.mode == "full"
    model = load_model(spec, train_policy, state_dir, device, param_dtype, meta=meta)
    if train_policy.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fsdp:
        from daemon.jobs import safetensors_rows, sharding

        sharding.shard(model, amp_dtype, train_policy.cpu_offload)
        if meta:
            sharding.materialise(model, torch.device("cpu") if train_policy.cpu_offload else device)
            safetensors_rows.load_rows(model, Path(spec.parent_dir))
    return model


def _continuable_adapter(adapter_in: str | None, train_policy: TrainPolicy) -> str | None:
    """The served adapter, when the policy's LoRA shape still matches it; a changed shape starts a new adapter."""
    if not adapter_in:
        return None
    cfg = json.loads((Path(adapter_in) / "adapter_config.json").read_text())
    shape = (cfg.get("r"), cfg.get("lora_alpha"), set(cfg.get("target_modules") or ()))
    return adapter_in if shape == (train_policy.lora_r, train_policy.lora_alpha, set(train_policy.lora_targets)) else None


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


def packed_inputs(model, ids: torch.Tensor, pos: torch.Tensor) -> dict:
    """The forward arguments of packed blocks ([B, L] each) under every attention implementation, all derived from
    the restarting position_ids. No attention mask and no KV cache: transformers then builds the per-document
    causal mask from the positions, row by row, for sdpa, eager and flex. Flash-attention takes no mask and
    transformers reads the positions only at batch size 1, so it gets the documents' cumulative lengths over the
    flattened micro-batch (the varlen kernel flattens it anyway), from transformers' own reading of positions."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    from transformers.utils.generic import is_flash_attention_requested

    kw: dict = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    if is_flash_attention_requested(config=_config(model)):
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(pos)
        kw.update(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))
    return kw


def _config(model):  # noqa: ANN001, ANN202 - a model, or DDP / torch.compile around one
    return getattr(model, "module", model).config


def packed_logits(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits of packed blocks (the whole vocabulary: for tests and inspection, not for the loss)."""
    return model(**packed_inputs(model, ids, pos)).logits


def micro_batch_loss(fwd, x: torch.Tensor, pos: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one packed micro-batch, in fp32 over chunks of tokens (lm_loss.token_nll).
    One function for the round and for the memory plan (daemon/jobs/memory_plan.py), which runs it on fake tensors."""
    nxt = torch.cat([y[:, 1:], torch.full_like(y[:, :1], IGNORE)], dim=1)  # position t predicts token t+1
    return token_nll(fwd, nxt, **packed_inputs(fwd, x, pos)).sum()


def optimizer_step(opt: torch.optim.Optimizer, params: list, scaler, grad_clip: float) -> torch.Tensor:
    """Clip, step, free the gradients; returns the norm before clipping (a DTensor under fsdp)."""
    if scaler is not None:
        scaler.unscale_(opt)  # clip the true gradients; a step with inf/nan gradients is skipped by scaler.step
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def make_optimizer(model, train_policy: TrainPolicy, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms, biases), as in nanoGPT. Low-precision parameters get
    AdamWFp32State: torch's AdamW would keep its moments in the parameters' bf16."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train_policy.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if any(p.dtype != torch.float32 for p in params):
        return AdamWFp32State(groups, lr=0.0, betas=(train_policy.beta1, train_policy.beta2), eps=train_policy.adam_eps)
    return torch.optim.AdamW(
        groups, lr=0.0, betas=(train_policy.beta1, train_policy.beta2), eps=train_policy.adam_eps, fused=device.type == "cuda"
    )


class AdamWFp32State(torch.optim.Optimizer):
    """AdamW for bf16 parameters (precision bf16-params): moments and the update in fp32, the parameter
    rounded to bf16 once per step. 12 bytes per parameter instead of 16, at the cost of updates smaller
    than bf16's resolution being lost (docs/round-engine.md, Precision, has the measurement)."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = float(st["step"])
                grad = p.grad.float()
                st["exp_avg"].lerp_(grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(g["eps"])
                w = p.float().mul_(1 - g["lr"] * g["weight_decay"])
                w.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / (1 - b1**t))
                p.copy_(w)


def trainable_digest(model) -> str | None:
    """sha256 over the trainable tensors in name order (fp32): which weights a round started from. fsdp: a collective
    gathering one tensor at a time, never the model; rank 0 gets the digest the unsharded model gives, others None."""
    h = hashlib.sha256()
    named = dict(model.named_parameters())
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for name in sorted(n for n, p in named.items() if p.requires_grad):
        t = named[name].detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank0:
            h.update(name.encode())
            h.update(t.float().cpu().contiguous().numpy().tobytes())
        del t
    return h.hexdigest()[:16] if rank0 else None


def save_sharded_state(dst: Path, model, opt, train_policy: TrainPolicy, state: dict, parent: Path, main_proc: bool) -> None:
    """fsdp: every rank writes its shard of the fp32 trainable weights and optimizer state (DCP), its RNG and its rows
    of the weights in the parent's dtype (LoRA: rank 0 the gathered adapter); rank 0 renames the dir when all are done."""
    from daemon.jobs import sharding

    tmp = dst.with_name(dst.name + ".tmp")
    if main_proc:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "resume").mkdir(parents=True)
    sharding.barrier()
    sharding.save_sharded(tmp, model, opt)
    torch.save({"cpu_rng": torch.get_rng_state()}, tmp / "resume" / f"rng-{state['rank']}.pt")
    export_weights(tmp, model, train_policy, parent, fsdp=True)
    if main_proc:
        (tmp / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "rank"}, indent=1))
    sharding.barrier()
    if main_proc:
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    sharding.barrier()


def save_state(dst: Path, model, opt, scaler, train_policy: TrainPolicy, state: dict, parent: Path) -> None:
    """Write a complete state dir atomically (tmp dir + rename), so a kill leaves either nothing or all of it.

    Weights go out in the parent's dtype (servable, evaluable as they are); when the trainable parameters
    are kept in another dtype (fp32 masters over a bf16 parent) they are saved too, so a resume is exact."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(tmp, model, train_policy, parent)
    save_dtype = checkpoint_dtype(parent)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(p.dtype != save_dtype for p in trainable.values()):
        from safetensors.torch import save_file

        (tmp / MASTER_FILE).parent.mkdir(exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(tmp / MASTER_FILE))
    (tmp / OPTIMIZER_FILE).parent.mkdir(exist_ok=True)
    torch.save({"optimizer": opt.state_dict()}, tmp / OPTIMIZER_FILE)  # its own file: dropped once not the newest
    blob = {"cpu_rng": torch.get_rng_state()}
    if scaler is not None:
        blob["grad_scaler"] = scaler.state_dict()
    torch.save(blob, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def export_weights(dst: Path, model, train_policy: TrainPolicy, parent: Path, fsdp: bool) -> None:
    """The servable weights of a state dir or final/; fsdp: a collective. Full weights under fsdp: each rank writes its
    rows into files laid out as the parent's, never gathered. LoRA under fsdp: the adapter is gathered on rank 0."""
    from daemon.jobs import sharding

    main_proc = not fsdp or torch.distributed.get_rank() == 0
    if fsdp and train_policy.mode == "full":
        sharding.write_weights(dst, model, parent)
        if main_proc:
            copy_parent_files(parent, dst)
        return
    full = sharding.full_state_dict(model, {n for n, p in model.named_parameters() if p.requires_grad}) if fsdp else None
    if main_proc:
        save_weights(dst, model, train_policy, parent, full)


def save_weights(dst: Path, model, train_policy: TrainPolicy, parent: Path, full: dict | None = None) -> None:
    """full: an HF checkpoint dir (safetensors shards of at most 5 GB + index, tokenizer) whose config.json is the
    parent's, byte for byte; lora/qlora: adapter_config.json + adapter_model.safetensors (vLLM's LoRA layout).
    Tensors in the parent's dtype. `full`: the gathered adapter of a sharded LoRA model."""
    dst.mkdir(parents=True, exist_ok=True)
    dtype = checkpoint_dtype(parent)
    if train_policy.mode == "full":
        sd = {k: v.detach().to(dtype) for k, v in (full if full is not None else model.state_dict()).items()}
        model.save_pretrained(str(dst), state_dict=sd, safe_serialization=True, max_shard_size="5GB")
        copy_parent_files(parent, dst)
    else:
        from peft import get_peft_model_state_dict

        sd = {k: v.detach().to(dtype) for k, v in get_peft_model_state_dict(model, state_dict=full).items()}
        model.save_pretrained(str(dst), state_dict=sd, safe_serialization=True)


def copy_parent_files(parent: Path, dst: Path) -> None:
    """Not save_pretrained's re-serialisation of the config, which may reorder or add fields: the parent's files."""
    for name in (n for n in PARENT_FILES if (parent / n).exists()):
        shutil.copyfile(parent / name, dst / name)


def load_trainer_state(src: Path, opt, scaler) -> dict:
    """Rank 0 saved from its GPU (cuda:0): read into host memory, not onto cuda:0 by every rank; load_state_dict then
    moves each optimizer tensor to its parameter's device, this rank's own. The RNG state must stay on the CPU."""
    blob = torch.load(src / "trainer_state.pt", weights_only=True, map_location="cpu")
    if (src / OPTIMIZER_FILE).exists():  # before it had its own file, trainer_state.pt held the optimizer
        blob.update(torch.load(src / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))
    opt.load_state_dict(blob["optimizer"])
    if scaler is not None and "grad_scaler" in blob:
        scaler.load_state_dict(blob["grad_scaler"])
    torch.set_rng_state(blob["cpu_rng"])
    return json.loads((src / "state.json").read_text())


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp") and (p / "state.json").exists())
    return done[-1] if done else None


def state_megabytes(model, opt) -> float:
    """What this rank holds of the training state: its parameters (fsdp: its shards), gradients of the trainable
    ones, and optimizer state; activations not included. On CPU, the figure comparable to CUDA's allocated bytes."""

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = sum(nbytes(p) * (2 if p.requires_grad else 1) for p in model.parameters())
    total += sum(nbytes(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return total / 2**20


def release_freed_host_memory() -> None:
    """glibc: serve every host allocation over 128 KiB from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold (up to 32 MiB) after the first large free, and from then on puts tensors of that
    size on the heap, where the holes activations and all-gather buffers leave behind stay resident: a CPU round's
    RSS then grew by up to 1.5 GB over its first steps beyond what it held (bench/parallelism.py, docs/round-engine.md).
    A fixed threshold (glibc's own default, 128 KiB) disables that raise. No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
    except OSError:
        pass


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this rank since reset_peak_memory: CUDA allocated on a GPU, resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_memory_mb": int(line.split()[1]) / 1024, "peak_memory_kind": "rss"}
    except OSError:
        pass
    return {}


# ---------------------------------------------------------------- the round


def process_group_options(device: torch.device, timeout_min: float) -> dict:
    """init_process_group's arguments for a rank on `device`: the backend follows the device the policy names (a
    CPU round on a CUDA host stays on gloo, and a CUDA one gets nccl), NCCL binds eagerly to the rank's own GPU
    (device_id), and the timeout is the policy's: ranks wait at a barrier while rank 0 evaluates or writes."""
    from datetime import timedelta

    cuda = device.type == "cuda"
    return {"backend": "nccl" if cuda else "gloo", "timeout": timedelta(minutes=timeout_min), "device_id": device if cuda else None}


def gradient_sync(model: torch.nn.Module, ddp: bool, last: bool) -> AbstractContextManager:
    """The context of one micro-batch's backward. DDP all-reduces only on the last (no_sync before): its gradients
    are whole on every rank anyway. FSDP2 keeps its default, a reduce-scatter every micro-batch, as torchtitan does:
    the gradients accumulate in each rank's shard; turning the sync off kept every layer's fp32 gradient unsharded
    on every rank until the last micro-batch (issue 23: 30 GiB per GPU for an 8B model, whatever the world size)."""
    return cast("DistributedDataParallel", model).no_sync() if ddp and not last else nullcontext()


class Progress:
    """JSON lines to OUT/progress.jsonl and stdout; on a resume, records for re-run steps appear again (take the last)."""

    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a", encoding="utf-8") if enabled else None

    def __call__(self, event: str, **kw) -> None:
        if self.f is None:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **kw})
        self.f.write(line + "\n")
        self.f.flush()
        print(line, flush=True)


def run(spec: TrainSpec) -> dict:
    train_policy, sp = spec.train, spec.schedule  # typed from the policy file on: TrainPolicy, SchedulePolicy
    out = Path(spec.out_dir)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if train_policy.cpu_offload and not distributed:  # before anything is read or written
        raise SystemExit(
            "train.cpu_offload with one rank: offloading is FSDP's, and one rank is not sharded, so the training state "
            "would stay on the GPU; run fsdp on several ranks (CPTD_TRAIN_LAUNCHER=torchrun:N, N > 1) or drop cpu_offload"
        )
    device = resolve_device(train_policy.device)
    if device.type == "cuda":  # before init: NCCL binds the rank to the current device
        torch.cuda.set_device(device)
    if distributed:
        import torch.distributed as dist

        dist.init_process_group(**process_group_options(device, train_policy.collective_timeout_min))
    ddp, fsdp = distributed and train_policy.parallelism == "ddp", distributed and train_policy.parallelism == "fsdp"
    rank, world = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    main_proc = rank == 0
    parent = Path(spec.parent_dir)
    parent_dtype = checkpoint_dtype(parent)
    precision = resolve_precision(train_policy.precision, dtype_name(parent_dtype), device.type, "fsdp" if fsdp else "ddp")
    # bf16-params trains the weights in bf16 itself; every other precision keeps fp32 trainable (master) weights.
    param_dtype = torch.bfloat16 if precision == "bf16-params" else torch.float32
    amp_dtype = DTYPES[MIXED[precision]] if precision in MIXED else None
    if spec.cpu_threads:
        torch.set_num_threads(spec.cpu_threads)
    if device.type == "cpu" or train_policy.cpu_offload:  # the training state lives in host memory
        release_freed_host_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    if main_proc:  # one trainer per out dir: a rerun waits until one left over from a killed daemon has died
        lock = open(out / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    spec_file = out / "spec.json"
    if spec_file.exists() and TrainSpec.from_json(spec_file.read_text()).digest() != spec.digest():
        raise SystemExit(f"{out} belongs to a different spec; refusing to mix rounds")
    if main_proc:  # tmp + rename: the other ranks read it at the same time (a resume found it half written)
        (out / "spec.json.tmp").write_text(spec.to_json())
        os.replace(out / "spec.json.tmp", spec_file)
    if (out / "result.json").exists():  # finished already: a rerun is a no-op
        return json.loads((out / "result.json").read_text())
    log = Progress(out / "progress.jsonl", main_proc)

    # Data: a pure function of the spec, rebuilt identically on every (re)run.
    tokenizer = load_tokenizer(parent)
    rng = random.Random(spec.data_seed)
    new_docs = tokenize_docs(tokenizer, read_texts(spec.new_path))
    docs, replay_tok = mix_documents(new_docs, tokenize_docs(tokenizer, read_texts(spec.replay_path)), spec.replay_ratio, rng)
    ids, pos, tgt = pack(docs, train_policy.seq_len, tokenizer.bos_token_id)
    n_blocks = ids.shape[0]
    per_step = train_policy.micro_batch_size * train_policy.grad_accum * world
    main_steps = train_policy.max_steps or max(1, math.floor(train_policy.epochs * n_blocks / per_step))
    anneal_steps = anneal_steps_for(sp, main_steps)
    total_steps = main_steps + anneal_steps
    heldout = {
        "new": read_texts(spec.heldout_new_path)[: train_policy.eval_max_docs],
        "replay": read_texts(spec.heldout_replay_path)[: train_policy.eval_max_docs],
    }

    # State: newest checkpoint of this round, else the main line it continues, else the parent.
    ckpt_dir = out / "checkpoints"
    ckpt = latest_checkpoint(ckpt_dir)
    mainline_in = Path(spec.mainline_in) if (sp.kind == "infinite" and spec.mainline_in) else None
    state_dir = ckpt or mainline_in
    if state_dir and (saved_world := json.loads((state_dir / "state.json").read_text()).get("world_size", world)) != world:
        raise SystemExit(
            f"{state_dir} was written by {saved_world} ranks and this run has {world}: the data order and the LR schedule "
            "depend on the world size, so a round resumes only with the world size it started with"
        )
    # fsdp: built from the parent, sharded, then the trainable weights and optimizer come from the DCP shards.
    model = model_for_round(spec, train_policy, str(state_dir) if state_dir and not fsdp else None, device, param_dtype, amp_dtype, fsdp)
    if fsdp:
        from daemon.jobs import sharding
    opt = make_optimizer(model, train_policy, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None  # fp16's range needs loss scaling
    torch.manual_seed(spec.init_seed)  # before loading state, which restores the RNG of a resumed run
    global_step0, step, tokens = 0, 0, 0
    if mainline_in:
        global_step0 = json.loads((mainline_in / "state.json").read_text())["global_step"]
    if state_dir and fsdp:
        sharding.load_sharded(state_dir, model, opt)
        torch.set_rng_state(torch.load(state_dir / "resume" / f"rng-{rank}.pt", weights_only=True)["cpu_rng"])
        st = json.loads((state_dir / "state.json").read_text())
    elif state_dir:
        st = load_trainer_state(state_dir, opt, scaler)
    if state_dir and ckpt:
        step, tokens = st["step"], st["tokens"]
    init_from = "checkpoint" if ckpt else ("mainline" if mainline_in else "parent")
    if init_from == "parent" and train_policy.mode != "full" and _continuable_adapter(spec.adapter_in, train_policy):
        init_from = "adapter"
    opt_steps0 = max((int(s["step"]) for s in opt.state_dict()["state"].values()), default=0)
    init_digest = trainable_digest(model)  # fsdp: a collective, one tensor at a time
    log(
        "start",
        round_id=spec.round_id,
        spec=spec.digest(),
        init_from=init_from,
        resumed_at=step,
        init_digest=init_digest,
        optimizer_steps=opt_steps0,
        global_step0=global_step0,
        main_steps=main_steps,
        anneal_steps=anneal_steps,
        total_steps=total_steps,
        n_blocks=n_blocks,
        tokens_per_step=per_step * train_policy.seq_len,
        replay_tokens=replay_tok,
        new_tokens=sum(map(len, new_docs)),
        schedule=sp.kind,
        mode=train_policy.mode,
        device=str(device),
        world_size=world,
        parallelism=train_policy.parallelism if distributed else "none",
        precision=precision,
        parent_dtype=dtype_name(parent_dtype),
    )

    raw_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = resolve_compile(train_policy.compile, device.type, train_policy.mode) if spec.compile is None else spec.compile
    fwd = torch.compile(model) if compiled else model

    def autocast():  # noqa: ANN202 - fsdp casts through its MixedPrecisionPolicy instead
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None and not fsdp else nullcontext()

    params = [p for p in raw_model.parameters() if p.requires_grad]
    ckpt_dir.mkdir(exist_ok=True)

    def evaluate(at: int) -> None:  # fsdp: every rank runs the forward (its collectives), rank 0 logs
        if (main_proc or fsdp) and (heldout["new"] or heldout["replay"]):
            with autocast():
                losses = {
                    f"loss_heldout_{k}": mean_token_loss(raw_model, tokenizer, v, max_len=train_policy.seq_len).mean_nll
                    for k, v in heldout.items()
                    if v
                }
            log("eval", step=at, global_step=global_step0 + min(at, main_steps), **losses)

    def state(at: int) -> dict:
        return {
            "step": at,
            "tokens": tokens,
            "global_step": global_step0 + min(at, main_steps),
            "spec": spec.digest(),
            "round_id": spec.round_id,
            "world_size": world,
        }

    def save(dst: Path, at: int) -> None:
        if fsdp:
            save_sharded_state(dst, raw_model, opt, train_policy, {**state(at), "rank": rank}, parent, main_proc)
        elif main_proc:
            save_state(dst, raw_model, opt, scaler, train_policy, state(at), parent)

    def checkpoint(at: int) -> None:
        save(ckpt_dir / f"step-{at:08d}", at)
        if main_proc:
            done = sorted(p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp"))
            for old in done[: -train_policy.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            for old in done[-train_policy.keep_checkpoints : -1]:  # a resume reads the newest only
                drop_optimizer_state(old)
            log("checkpoint", step=at, path=str(ckpt_dir / f"step-{at:08d}"))
        if distributed:
            torch.distributed.barrier()

    if step == 0:
        evaluate(0)
    model.train()
    load_peak = peak_memory(device).get("peak_memory_mb", 0.0)  # process start, load, the start digest's gather
    reset_peak_memory(device)  # peak_memory_mb in `done` is what the training steps hold, not the load
    train_peak: dict = {}
    while step < total_steps:
        if sp.kind == "infinite" and step == main_steps and (main_proc or fsdp) and not (out / "mainline" / "state.json").exists():
            save(out / "mainline", step)
            log("mainline", path=str(out / "mainline"), global_step=global_step0 + main_steps)
        lr, phase = round_lr(sp, step, main_steps, global_step0)
        for g in opt.param_groups:
            g["lr"] = lr
        # Main line reads the round's stream; the anneal branch a re-shuffled pass of the same mixture.
        stream_seed, stream_pos = (spec.data_seed, step) if phase == "main" else (spec.data_seed + 1, step - main_steps)
        blocks = blocks_at(n_blocks, stream_seed, stream_pos * per_step, per_step)
        mine = blocks[rank::world]
        n_tgt = int((tgt[mine][:, 1:] != IGNORE).sum())
        t0 = time.perf_counter()
        loss_sum = 0.0
        for m in range(train_policy.grad_accum):
            b = mine[m * train_policy.micro_batch_size : (m + 1) * train_policy.micro_batch_size]
            x, p, y = ids[b].to(device), pos[b].to(device), tgt[b].to(device)
            with gradient_sync(model, ddp, last=m == train_policy.grad_accum - 1):
                with autocast():
                    loss = micro_batch_loss(fwd, x, p, y)
                scaled = loss / n_tgt
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += float(loss.detach())
        norm = optimizer_step(opt, params, scaler, train_policy.grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # fsdp: a DTensor
        step += 1
        tokens += n_tgt * world
        dt = time.perf_counter() - t0
        log(
            "step",
            step=step,
            global_step=global_step0 + min(step, main_steps),
            phase=phase,
            tokens=tokens,
            loss=loss_sum / n_tgt,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=n_tgt * world / dt,
        )
        if step == total_steps:
            train_peak = {**peak_memory(device), "state_mb": state_megabytes(raw_model, opt)}  # before the final gather
        if step % train_policy.eval_interval == 0 or step in (main_steps, total_steps):
            evaluate(step)
        if step % train_policy.checkpoint_interval == 0 or step in (main_steps, total_steps):
            checkpoint(step)

    result = {
        "round_id": spec.round_id,
        "spec": spec.digest(),
        "steps": total_steps,
        "main_steps": main_steps,
        "anneal_steps": anneal_steps,
        "tokens": tokens,
        "final": str(out / "final"),
        "mainline": str(out / "mainline") if sp.kind == "infinite" else None,
        "global_step": global_step0 + main_steps,
        "mode": train_policy.mode,
        "precision": precision,
        "compiled": compiled,
        "dtype": dtype_name(parent_dtype),  # what final/, checkpoints and the main line are written in
        "parallelism": train_policy.parallelism if distributed else "none",
        "world_size": world,
        **train_peak,  # rank 0's, over the training steps (ranks are symmetric)
    }
    if main_proc:
        for d in ("final", "final.tmp"):
            shutil.rmtree(out / d, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()
    if main_proc or fsdp:  # fsdp: every rank writes its rows
        export_weights(out / "final.tmp", raw_model, train_policy, parent, fsdp)
    if main_proc:
        os.replace(out / "final.tmp", out / "final")
        if train_peak:  # the whole process on rank 0: load, training, checkpoints and the final gather and write
            result["process_peak_memory_mb"] = max(load_peak, peak_memory(device).get("peak_memory_mb", 0.0))
        if sp.kind == "infinite" and not (out / "mainline" / "state.json").exists():  # an anneal of 0 steps cannot happen, but be sure
            raise RuntimeError("main line was not saved")
        write_result(spec.result_file, result)
        log("done", **result)
    if distributed:
        torch.distributed.barrier()  # no rank exits (and tears the group down) while rank 0 still writes
        torch.distributed.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.trainer SPEC.json")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout carries progress JSON lines only
    run(TrainSpec.from_json(Path(argv[0]).read_text()))


if __name__ == "__main__":
    main()
