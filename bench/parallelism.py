"""DDP vs FSDP2 with the round trainer: per-rank peak memory and tokens/s, one run each, same spec.

    python bench/parallelism.py                       # CPU, gloo, 2 ranks, ~100M-parameter Llama (fp32), ~3 min
    python bench/parallelism.py --config 300m         # the same at 325M parameters, ~7 min, ~12 GB of RAM
    python bench/parallelism.py --device cuda --nproc 1 --config 0.5b

Both runs are `torchrun --nproc-per-node N -m daemon.jobs.trainer SPEC` with
only `train.parallelism` different. Per rank (rank 0's figures from the
trainer's result):

- training state: bytes of the parameters this rank holds (FSDP: its shards),
  their gradients and the optimizer state, summed from the live tensors after
  the last step: on CPU the counterpart of CUDA's allocated bytes;
- peak (the acceptance figure): the most this rank held during the training
  steps. On CPU the resident set's high-water mark (VmHWM), reset right before
  the first step and read after the last one: every forward, backward,
  collective and optimizer step, plus what the process holds anyway (torch and
  transformers, the tokenizer, the packed data: about 580 MB here, the same in
  both runs); not the load of the parent before the first step, nor the final
  gather and write of the candidate after the last one. On a GPU, CUDA's max
  allocated bytes over the same steps;
- process peak: rank 0's high-water mark over its whole life, load, training
  and the final gather and write of the candidate included (under FSDP rank 0
  gathers the whole model to write it).

The baseline is DDP; the target is FSDP at most 0.6x its per-rank peak with 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file  # noqa: E402

from bench.train_throughput import build_model, documents  # noqa: E402
from daemon.jobs.specs import TrainSpec  # noqa: E402

CONFIGS = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, seq_len, micro batch)
    "100m": (768, 2048, 12, 12, 12, 8192, 128, 2),  # 97M parameters
    "300m": (1024, 2816, 24, 16, 16, 8192, 128, 2),  # 325M parameters
    "tiny": (128, 256, 2, 2, 2, 512, 64, 4),
    "0.5b": (1280, 3456, 20, 20, 20, 32000, 2048, 8),
}


def one(parent: Path, data: Path, out: Path, parallelism: str, a: argparse.Namespace) -> dict:
    cfg = CONFIGS[a.config]
    spec = TrainSpec(
        parent_dir=str(parent),
        out_dir=str(out),
        new_path=str(data),
        schedule={"kind": "constant", "peak_lr": 3e-4},
        train={
            "seq_len": cfg[6],
            "micro_batch_size": cfg[7],
            "grad_accum": 1,
            "max_steps": a.steps,
            "eval_interval": 10**6,
            "checkpoint_interval": 10**6,
            "device": a.device,
            "parallelism": parallelism,
        },
        cpu_threads=a.threads,
    )
    path = out.with_suffix(".json")
    path.write_text(spec.to_json())
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}"]
    cmd = [sys.executable, *launcher, "-m", "daemon.jobs.trainer", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    if done.returncode != 0:
        raise SystemExit(f"{parallelism} run failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    steps = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines() if '"event": "step"' in x]
    timed = steps[1:] or steps  # the first step pays one-off costs
    return {
        "parallelism": parallelism,
        "peak_mb": result.get("peak_memory_mb"),
        "state_mb": result.get("state_mb"),
        "peak_kind": result.get("peak_memory_kind"),
        "process_peak_mb": result.get("process_peak_memory_mb"),
        "tokens_per_s": sum(s["tokens_per_s"] for s in timed) / len(timed),
        "loss": steps[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="DDP vs FSDP2: per-rank peak memory and tokens/s")
    ap.add_argument("--config", default="100m", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        texts = documents(1500, seed=1)
        parent = build_model(root / "parent", CONFIGS[a.config], texts)
        data = root / "docs.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        n = sum(t.numel() for t in load_file(str(parent / "model.safetensors")).values())
        rows = [one(parent, data, root / mode, mode, a) for mode in ("ddp", "fsdp")]
    ddp, fsdp = rows
    print(f"config {a.config} ({n / 1e6:.0f}M parameters, fp32), {a.nproc} ranks on {a.device}, {a.steps} steps; baseline = DDP")
    kind = ddp["peak_kind"]
    print(
        f"{'parallelism':<12} {'state MB/rank':>14} {'peak ' + kind + ' MB/rank':>20} {'process peak MB':>16} {'tokens/s':>10} {'loss':>7}"
    )
    for r in rows:
        print(
            f"{r['parallelism']:<12} {r['state_mb']:>14.0f} {r['peak_mb']:>20.0f} {r['process_peak_mb']:>16.0f} "
            f"{r['tokens_per_s']:>10.0f} {r['loss']:>7.3f}"
        )
    print(
        f"FSDP / DDP per rank: peak {kind} x{fsdp['peak_mb'] / ddp['peak_mb']:.2f} (target <= 0.60), "
        f"training state x{fsdp['state_mb'] / ddp['state_mb']:.2f}, "
        f"process peak (rank 0) x{fsdp['process_peak_mb'] / ddp['process_peak_mb']:.2f}, "
        f"tokens/s x{fsdp['tokens_per_s'] / ddp['tokens_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
