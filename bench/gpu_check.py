"""The GPU check (issue 23): what only a GPU can say about a production round, in one run of a few minutes.

    bash bench/gpu_check.sh                                  # on a lent GPU machine (the device tool): all four checks
    python bench/gpu_check.py --device cpu --config tiny     # here: the same code path, no MFU and no 4-bit

1. MFU by 6N of the 0.5B config, eager and compiled, with the production round's train settings (the policy file's
   `train` section as a round gets it: micro-batch, seq_len, grad_accum, precision; only the step count and device
   are set here). The peak is the device's own: SMs x dense bf16 FLOP per clock per SM x the maximum SM clock
   (NVML), beside the rate a large bf16 matmul reaches on it, so no constant decides the figure.
2. The memory plan's prediction (`python -m daemon.jobs.memory_plan`, fake tensors) against the peak the eager run
   measured (torch.cuda.max_memory_allocated over the training steps).
3. The candidate of a round on a bf16 parent passes `validate_checkpoint` and is written in bf16.
4. 4-bit NF4: the device check job, then a short qlora round on the tiny config.

Every check runs the real job modules in their own process, as a round does. The summary is one JSON object
(`--out`); bench/README.md, "GPU check", says how to read it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.train_throughput import CONFIGS, bench_spec, build_model, device_peak, documents, matmul_params, production_train  # noqa: E402
from daemon.jobs.specs import DeviceCheckSpec, PlanResult, PlanSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def job(spec: Any, where: Path, log: Path) -> dict:
    """One job as a round runs it: its module in a fresh process (a fresh CUDA context, so peaks are its own)."""
    path = spec.write(where)
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", spec.module, str(path)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{spec.module} exited {done.returncode}: {log.read_text()[-2000:]}")
    return json.loads(Path(spec.result_file).read_text())


def train_run(model: Path, data: Path, out: Path, train: dict, warm: int, compile_: bool) -> dict:
    spec = bench_spec(model, data, out, train, compile_)
    t0 = time.time()
    result = job(spec, out.parent / f"{out.name}-spec.json", out.parent / f"{out.name}.log")
    ev = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    st = [e for e in ev if e.get("event") == "step"]
    return {
        "wall_s": round(time.time() - t0, 1),
        "tokens_per_s": (st[-1]["tokens"] - st[warm - 1]["tokens"]) / (st[-1]["time"] - st[warm - 1]["time"]),
        "loss_first": st[0]["loss"],
        "loss_last": st[-1]["loss"],
        "peak_memory_mb": result.get("peak_memory_mb"),
        "peak_memory_kind": result.get("peak_memory_kind"),
        "precision": result["precision"],
        "dtype": result["dtype"],
        "final": result["final"],
    }


def plan_peak(model: Path, train: dict, out: Path) -> dict:
    spec = PlanSpec(model_shape=json.loads((model / "config.json").read_text()), train=train, gpus=1, out=str(out / "plan.json"))
    r = PlanResult.model_validate(job(spec, out / "plan-spec.json", out / "plan.log"))
    return {"peak_mb": r.peak / 2**20, "activations_mb": r.activations / 2**20, "parameters_mb": r.parameters / 2**20}


def candidate_check(final: str, parent: Path) -> dict:
    from safetensors import safe_open

    from connectors.vllm import CheckpointError, validate_checkpoint

    try:
        validate_checkpoint(final, parent)
        problem = None
    except CheckpointError as e:
        problem = str(e)
    dtypes: set[str] = set()
    for f in Path(final).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}
    return {"validated": problem is None, "problem": problem, "tensor_dtypes": sorted(dtypes)}


def four_bit(device: str, d: Path, texts: list[str], data: Path) -> dict:
    check = job(DeviceCheckSpec(device=device, out=str(d / "device.json")), d / "device-spec.json", d / "device.log")
    if check["refusal"]:
        return {"refusal": check["refusal"]}
    tiny = build_model(d / "tiny", CONFIGS["tiny"], texts, dtype=torch.bfloat16)
    train = {"mode": "qlora", "seq_len": CONFIGS["tiny"][6], "micro_batch_size": 4, "grad_accum": 1, "device": device, "max_steps": 5}
    r = train_run(tiny, data, d / "qlora", train, warm=1, compile_=False)
    return {"refusal": None, "loss_first": r["loss_first"], "loss_last": r["loss_last"], "tokens_per_s": r["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="0.5b", choices=sorted(CONFIGS))
    ap.add_argument("--policy", default=str(ROOT / "deploy" / "policy.example.yaml"), help="whose `train` section a round gets")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps not timed (compilation happens in the first)")
    ap.add_argument("--out", default=None, help="write the summary JSON here too")
    a = ap.parse_args()
    cfg = CONFIGS[a.config]
    small = a.device == "cpu"  # the CPU configs keep their own small shape; every other setting is the policy's
    train = production_train(a.policy, a.device, a.steps, cfg[6] if small else None, cfg[7] if small else None)
    shown = ("mode", "precision", "parallelism", "micro_batch_size", "seq_len", "grad_accum", "activation_checkpointing")
    report: dict[str, Any] = {"device": a.device, "config": a.config, "policy": a.policy, "train": {k: train[k] for k in shown}}
    if a.device == "cuda":
        report["gpu"] = device_peak()
    seqs = a.steps * train["micro_batch_size"] * train["grad_accum"]
    texts = documents(max(400, int(seqs * train["seq_len"] / 60 * 1.3)), 0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = build_model(d / "model", cfg, texts, dtype=torch.bfloat16)  # a production parent is a bf16 checkpoint
        data = d / "docs.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        n_mm, layers, hidden = matmul_params(model)
        runs = {"eager": False, "compiled": True} if a.device == "cuda" else {"eager": False}
        for name, compile_ in runs.items():
            r = train_run(model, data, d / name, train, a.warmup_steps, compile_)
            if "gpu" in report:
                flops = 6 * n_mm * r["tokens_per_s"]
                r["mfu_vs_spec_peak"] = flops / report["gpu"]["peak_flops"] if report["gpu"]["peak_flops"] else None
                r["mfu_vs_measured_matmul"] = flops / report["gpu"]["matmul_flops"]
            report[name] = r
        plan = plan_peak(model, train, d)
        measured, kind = report["eager"]["peak_memory_mb"], report["eager"]["peak_memory_kind"]
        # On a GPU the two count the same thing (tensors the allocator holds); a CPU's RSS adds the whole process.
        ratio = measured / plan["peak_mb"] if measured and kind == "cuda_allocated" else None
        report["plan"] = {**plan, "measured_mb": measured, "measured_kind": kind, "measured_over_plan": ratio}
        report["candidate"] = candidate_check(report["eager"]["final"], model)
        report["nf4"] = four_bit(a.device, d, texts, data)
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
