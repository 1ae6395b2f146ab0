"""FSDP2 for the trainer (`train.parallelism: fsdp`): sharding, sharded checkpoints, consolidated weights.

Why: full-weight CPT of a 7-8B model needs 12-16 bytes per parameter of
training state, more than one 80 GB GPU holds, and DDP keeps all of it on
every rank. FSDP2 (`fully_shard`) splits parameters, gradients and AdamW state
across ranks: a unit for the input embedding, one per decoder layer, one for
the LM head and the root, the way torchtitan wraps its models. Mid-round state is written with torch.distributed.checkpoint
(each rank its own shard, fp32 masters and optimizer state, so a resume is
exact). Full-weight models are never whole on any rank: built on the meta
device, sharded, materialised as shards, and each rank reads its rows of the
parent's safetensors and writes its rows of the consolidated weights vLLM and
the evaluator read (daemon/jobs/safetensors_rows.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from daemon.jobs.specs import OPTIMIZER_STATE

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import PreTrainedModel

DCP_DIR = "resume/dcp"  # inside a checkpoint / main-line directory, beside the consolidated weights: fp32 masters
OPTIM_DIR = OPTIMIZER_STATE[0]  # beside it: the optimizer state's shards, dropped from all but the newest checkpoint


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build a model whose parameters live on the meta device (no memory, no initialisation) while its buffers are
    made for real: the rotary inv_freq a Llama computes at construction is not in its checkpoint, and its values
    must be the ones a normal load computes. What accelerate's init_empty_weights(include_buffers=False) does."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Give a sharded meta model storage for its shards on `device` (values: garbage until loaded); its buffers,
    made for real by parameters_on_meta, keep their values."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: Hugging Face names their classes *DecoderLayer (Llama, Mistral, Qwen, Gemma...)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no *DecoderLayer modules to shard")
    return layers


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None, cpu_offload: bool, mesh: DeviceMesh | None = None) -> torch.nn.Module:
    """fully_shard each unit (embedding, decoder layers, LM head), then the root. Compute in `compute_dtype` (bf16-mixed), gradients reduced
    in fp32, fp32 masters kept sharded; optionally all of it in CPU memory. `mesh`: the default (all ranks) unless
    given; the memory plan passes one made before it enters torch's fake-tensor mode."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
    kw: dict = {"mp_policy": mp, "mesh": mesh}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    sharded = units(model)
    for i, unit in enumerate(sharded):
        # The last unit's forward ends where backward begins, which would gather it again at once: keep it gathered
        # (torchtitan's default; FSDP2 already does so for the root). 8B: the 1 GiB LM head held for that moment.
        fully_shard(unit, reshard_after_forward=i < len(sharded) - 1, **kw)
    fully_shard(model, **kw)
    return model


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded below the root, in forward order: the input embedding, each decoder layer, the output
    projection. The embedding and the LM head in their own units (torchtitan's wrapping) are gathered only around
    their own forward and backward instead of through the whole step, as the root's parameters are; tied to each
    other (one parameter) they stay in the root."""
    get_base = getattr(model, "get_base_model", None)  # peft's wrapper, which types its base as a plain nn.Module
    inner = cast("PreTrainedModel", get_base() if get_base is not None else model)
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    tied = emb is not None and head is not None and getattr(emb, "weight", None) is getattr(head, "weight", 0)
    first = [emb] if emb is not None and not tied else []
    last = [head] if head is not None and not tied else []
    return first + decoder_layers(model) + last


def _trainable(model: torch.nn.Module) -> dict:
    """The sharded state dict of the trainable parameters (LoRA: the adapter only; the frozen base is the parent's)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


def save_sharded(state_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the trainable parameters (fp32, DCP_DIR) and of the optimizer state (OPTIM_DIR):
    two checkpoints, so an older checkpoint can drop its optimizer state and keep its masters."""
    dcp.save({"model": _trainable(model)}, checkpoint_id=str(state_dir / DCP_DIR))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(state_dir / OPTIM_DIR))


def load_sharded(state_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load what save_sharded wrote into an already sharded model and its optimizer (same world size)."""
    state = {"model": _trainable(model)}
    dcp.load(state, checkpoint_id=str(state_dir / DCP_DIR))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    optim = {"optim": get_optimizer_state_dict(model, opt)}
    # a main line written before the optimizer state had its own directory holds both in DCP_DIR
    dcp.load(optim, checkpoint_id=str(state_dir / (OPTIM_DIR if (state_dir / OPTIM_DIR).exists() else DCP_DIR)))
    set_optimizer_state_dict(model, opt, optim["optim"])


def full_state_dict(model: torch.nn.Module, names: set[str] | None = None) -> dict:
    """The model (or the tensors in `names`), gathered on rank 0 in CPU memory (other ranks get {}); a collective:
    every rank calls it. LoRA's adapter only: full weights are written row-wise, never gathered."""
    sd = {k: v for k, v in model.named_parameters() if names is None or k in names}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for k, v in sd.items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        if rank0:
            out[k] = full.detach().cpu()
        del full
    return out


def write_weights(dst: Path, model: torch.nn.Module, like: Path) -> None:
    """Every rank writes its rows of the consolidated weights into `dst`, in the files, names and dtypes of `like`
    (the parent); rank 0 creates the files first. A collective: every rank calls it."""
    from daemon.jobs import safetensors_rows

    if not dist.is_initialized() or dist.get_rank() == 0:
        safetensors_rows.write_headers(dst, like)
    barrier()
    safetensors_rows.write_rows(model, dst, safetensors_rows.layout(like)[0])
    barrier()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
