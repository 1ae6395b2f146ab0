"""Training precisions on a bf16 parent: speed, memory, what is written, and how many updates survive.

    python bench/precision.py                         # CPU, small Llama
    python bench/precision.py --device cuda --config 0.5b

For each `train.precision` the same round (same parent, documents, steps, LR)
runs through daemon.jobs.trainer and the bench prints, against bf16-mixed
(fp32 master weights under bf16 autocast, the default for bf16 parents) as the
baseline:

- tokens/s of the timed steps;
- training-state bytes per parameter: parameters + gradients + optimizer state,
  summed from the live tensors after one step (on CUDA also the peak allocated);
- the dtype of every tensor the candidate is written in (must be BF16);
- updates kept: the share of weight elements the written candidate changed
  after `--steps` steps at a CPT-sized LR (`--lr`, default 2e-5). A bf16 weight
  of magnitude |w| moves only when an update exceeds half its spacing
  (|w| * 2^-8); with no fp32 master, smaller updates are rounded away every step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.train_throughput import CONFIGS, build_model, documents  # noqa: E402
from daemon.dev.tiny_model import cast_checkpoint  # noqa: E402
from daemon.jobs.specs import TrainSpec  # noqa: E402
from daemon.jobs.trainer import load_model, make_optimizer, run  # noqa: E402
from policies.train import MIXED, TrainPolicy, resolve_precision  # noqa: E402

MODES = ["bf16-mixed", "bf16-params", "fp32"]


def state_bytes(parent: Path, train: dict, device: torch.device) -> tuple[float, float]:
    """(bytes per parameter of params + grads + optimizer state after one step, peak CUDA bytes or nan)."""
    train_policy = TrainPolicy.model_validate(train)
    prec = resolve_precision(train_policy.precision, "bfloat16", device.type)
    spec = TrainSpec(parent_dir=str(parent), out_dir="-", new_path="-", train=train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load_model(spec, train_policy, None, device, torch.bfloat16 if prec == "bf16-params" else torch.float32)
    opt = make_optimizer(model, train_policy, device)
    x = torch.randint(0, model.config.vocab_size, (train_policy.micro_batch_size, train_policy.seq_len), device=device)
    amp = torch.autocast(device.type, dtype=getattr(torch, MIXED[prec])) if prec in MIXED else torch.autocast(device.type, enabled=False)
    with amp:
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    total += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    del model, opt
    return total / n, peak


def main() -> None:
    ap = argparse.ArgumentParser(description="train.precision modes on a bf16 parent")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=2e-5, help="constant LR: a CPT-sized one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = CONFIGS[a.config]
    seq, mb = cfg[6], cfg[7]
    device = torch.device(a.device)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        texts = documents(4000 if a.config != "tiny" else 1000, seed=1)
        parent = cast_checkpoint(build_model(root / "fp32", cfg, texts), root / "bf16", "bfloat16")
        data = root / "docs.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        before = load_file(str(parent / "model.safetensors"))
        for mode in MODES:
            train = {
                "seq_len": seq,
                "micro_batch_size": mb,
                "grad_accum": 1,
                "max_steps": a.steps,
                "eval_interval": 10**6,
                "checkpoint_interval": 10**6,
                "device": a.device,
                "precision": mode,
                "weight_decay": 0.0,
            }
            bpp, peak = state_bytes(parent, train, device)
            spec = TrainSpec(
                parent_dir=str(parent),
                out_dir=str(root / mode),
                new_path=str(data),
                schedule={"kind": "constant", "peak_lr": a.lr},
                train=train,
                cpu_threads=a.threads,
            )
            t0 = time.perf_counter()
            r = run(spec)
            wall = time.perf_counter() - t0
            steps = [json.loads(x) for x in (root / mode / "progress.jsonl").read_text().splitlines() if '"event": "step"' in x]
            timed = steps[2:] or steps
            tps = sum(s["tokens_per_s"] for s in timed) / len(timed)
            after = load_file(str(Path(r["final"]) / "model.safetensors"))
            changed = sum(int((after[k] != before[k]).sum()) for k in before)
            elems = sum(v.numel() for v in before.values())
            rows.append(
                {
                    "precision": mode,
                    "tokens_per_s": tps,
                    "state_bytes_per_param": bpp,
                    "cuda_peak_gib": peak / 2**30,
                    "written_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in after.values()}),
                    "updates_kept": changed / elems,
                    "final_loss": steps[-1]["loss"],
                    "wall_s": wall,
                }
            )
    base = rows[0]
    if a.json:
        print(json.dumps({"config": a.config, "device": a.device, "lr": a.lr, "steps": a.steps, "rows": rows}, indent=1))
        return
    print(f"config {a.config} on {a.device}, {a.steps} steps at lr {a.lr:g}, bf16 parent; baseline = bf16-mixed")
    print(f"{'precision':<12} {'tokens/s':>10} {'x base':>7} {'B/param':>8} {'peak GiB':>9} {'written':>10} {'kept':>13} {'loss':>7}")
    for r in rows:
        print(
            f"{r['precision']:<12} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base['tokens_per_s']:>7.2f} "
            f"{r['state_bytes_per_param']:>8.1f} {r['cuda_peak_gib']:>9.2f} {','.join(r['written_dtypes']):>10} "
            f"{r['updates_kept']:>13.1%} {r['final_loss']:>7.3f}"
        )


if __name__ == "__main__":
    main()
