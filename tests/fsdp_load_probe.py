"""Run under torchrun by tests/test_sharded_io.py: a rank's host memory while the trainer loads an fsdp model and
writes its consolidated weights, then the loaded weights against the unsharded load's.

`python -m tests.fsdp_load_probe SPEC.json RESULT.json`: each rank loads with trainer.model_for_round (fsdp, full
weights) and exports with trainer.export_weights into OUT/export, measuring its resident set's high-water mark
over each (VmHWM, reset before) less its resident set before, with the trainer's mallopt. Rank 0 then loads the
parent the unsharded way and compares every parameter and buffer bit for bit, and writes RESULT.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from daemon.jobs.model_loader import load_causal_lm
from daemon.jobs.specs import TrainSpec
from daemon.jobs.trainer import export_weights, model_for_round, peak_memory, release_freed_host_memory, reset_peak_memory


def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn):  # noqa: ANN001, ANN201 - a test helper
    """fn's result and the growth of the resident set's high-water mark over it, in bytes."""
    reset_peak_memory(torch.device("cpu"))
    before = resident()
    out = fn()
    return out, int(peak_memory(torch.device("cpu"))["peak_memory_mb"] * 2**20) - before


def main() -> None:
    spec = TrainSpec.from_json(Path(sys.argv[1]).read_text())
    release_freed_host_memory()
    dist.init_process_group("gloo")
    rank, cpu = dist.get_rank(), torch.device("cpu")
    # the code a load runs, imported and run once on the meta device before measuring: the library's memory is
    # not the model's
    from transformers import AutoConfig, AutoModelForCausalLM

    from daemon.jobs import sharding

    with sharding.parameters_on_meta():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec.parent_dir))
    model, load = measured(lambda: model_for_round(spec, spec.train, None, cpu, torch.float32, torch.bfloat16, fsdp=True))

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    held = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    dst = Path(spec.out_dir) / "export"
    _, export = measured(lambda: export_weights(dst, model, spec.train, Path(spec.parent_dir), fsdp=True))
    full = {n: p.detach().full_tensor() for n, p in model.named_parameters()}  # after the measurements
    result = {"rank": rank, "load": load, "export": export, "held": held, "model_bytes": sum(t.numel() * 4 for t in full.values())}
    if rank == 0:
        ref = load_causal_lm(spec.parent_dir, device="cpu", dtype=torch.float32)
        ref_p, ref_b = dict(ref.named_parameters()), dict(ref.named_buffers())
        result["params_equal"] = full.keys() == ref_p.keys() and all(torch.equal(full[n], ref_p[n]) for n in full)
        result["buffers_equal"] = all(torch.equal(b, ref_b[n]) for n, b in model.named_buffers())
        result["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
