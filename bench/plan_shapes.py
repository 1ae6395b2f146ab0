"""The memory plan of three published shapes (docs/round-engine.md, Memory plan): no GPU, no weights.

    python bench/plan_shapes.py                 # all shapes and policies, ~2.5 min of CPU on one core
    python bench/plan_shapes.py --only 8b       # one shape

Each row is `python -m daemon.jobs.memory_plan SPEC` (what `cptd plan` runs): the trainer's own step, sharded by
the trainer's own FSDP code, on fake tensors and N fake ranks, under torch's memory tracker. Shapes are the
published config.json files in tests/data/model_shapes/. Policies: the default `train` section (what a policy
that says nothing gets, with parallelism fsdp where there are several GPUs) and one sized for the model
(the multi-gpu overlay's policy, deploy/k8s/overlays/multi-gpu/policy.yaml: fsdp, micro-batch 1, activation
checkpointing), each at grad_accum 4 and 1: under fsdp every micro-batch is
reduce-scattered, so accumulation holds sharded gradients only (it held every layer's unsharded, issue 23). The 8B row "issue 23's" is
the setting the issue measured (1 x 2048, no activation checkpointing, grad_accum 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.jobs.specs import PlanResult, PlanSpec  # noqa: E402
from policies.config import load_policy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "tests" / "data" / "model_shapes"
# "multi-gpu policy": the train section the multi-gpu overlay ships for 7B and up (fsdp, micro-batch 1 x 2048, AC on).
SIZED = load_policy(ROOT / "deploy" / "k8s" / "overlays" / "multi-gpu" / "policy.yaml").train.model_dump(mode="json")
# (key, shape file, GPUs, nodes, GiB per GPU, host GiB per node, volume GiB, [(policy name, train section)])
CASES = [
    ("0.5b", "qwen2.5-0.5b.json", 1, 1, 80, 64, 100, [("default", {}), ("accum 1", {"grad_accum": 1})]),
    (
        "8b",
        "llama-3-8b.json",
        8,
        1,
        80,
        256,
        500,
        [
            ("default", {"parallelism": "fsdp"}),
            ("multi-gpu policy", SIZED),
            ("multi-gpu policy, accum 1", {**SIZED, "grad_accum": 1}),
            ("issue 23's", {**SIZED, "activation_checkpointing": False, "grad_accum": 1}),
        ],
    ),
    (
        "70b",
        "llama-3-70b.json",
        16,
        2,
        80,
        256,
        500,
        [
            ("multi-gpu policy", SIZED),
            ("multi-gpu policy, accum 1", {**SIZED, "grad_accum": 1}),
        ],
    ),
]


def row(name: str, shape: str, gpus: int, nodes: int, gpu: float, r: PlanResult, spec: PlanSpec) -> str:
    def g(x: int) -> str:
        return f"{x / 2**30:,.1f}"

    t = spec.train
    fits = "yes" if not r.refusals else "**no**"
    return (
        f"| {shape} | {gpus} x {gpu:g} GiB / {nodes} | {name}: {t.micro_batch_size}x{t.seq_len}, accum {t.grad_accum}, "
        f"AC {'on' if t.activation_checkpointing else 'off'} | {g(r.peak)} | {g(r.parameters)} | {g(r.gradients)} "
        f"({g(r.accumulated_gradients)}) | {g(r.optimizer)} | {g(r.activations)} | {g(r.temporaries)} | {g(r.eval_peak)} | "
        f"{g(r.device_at_load)} | {g(r.host_load_per_rank)} | {g(r.host_export_rank0)} | {g(r.checkpoint_bytes)} | "
        f"{g(r.round_held_bytes)} | {fits} |"
    )


HEADER = (
    "| shape | GPUs / nodes | policy | peak | params | grads (held unsharded) | optimizer | activations | temporaries | "
    "eval peak | GPU at load | host at load, per rank | host at export, rank 0 | per checkpoint | held by a round | fits |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=[c[0] for c in CASES], default=None)
    a = ap.parse_args()
    rows, env = [], {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as d:
        for key, shape, gpus, nodes, gpu, host, volume, policies in CASES:
            if a.only and key != a.only:
                continue
            for name, train in policies:
                out = Path(d) / f"{key}-{len(rows)}.json"
                spec = PlanSpec(
                    model_shape=json.loads((SHAPES / shape).read_text()),
                    train=train,
                    gpus=gpus,
                    nodes=nodes,
                    gpu_memory_gb=gpu,
                    host_memory_gb=host,
                    volume_gb=volume,
                    out=str(out),
                )
                path = spec.write(Path(d) / f"spec-{len(rows)}.json")
                done = subprocess.run([sys.executable, "-m", spec.module, str(path)], capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"{shape} {name}: plan failed\n{done.stderr[-3000:]}")
                print(f"== {shape}, {name}\n{done.stdout}", flush=True)
                rows.append(row(name, shape.removesuffix(".json"), gpus, nodes, gpu, PlanResult.model_validate_json(out.read_text()), spec))
    print("per rank, GiB\n" + HEADER + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
