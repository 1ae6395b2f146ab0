"""Useful-token throughput of daemon.jobs.trainer against the Hugging Face Trainer; MFU on a GPU.

    python bench/train_throughput.py                                  # CPU, small Llama, both trainers, prints a ratio
    python bench/train_throughput.py --device cuda --config 0.5b      # GPU: adds model FLOPs utilisation (bf16)

Both trainers get the same model (same init), the same documents, the same
sequences per step, the same number of steps, AdamW with the same settings and
clip, fp32 on CPU / bf16 autocast on CUDA. What differs is what each does with
documents: ours packs them into full sequences (documents separated by EOS,
attention kept within each document); the HF Trainer gets the standard recipe
(`tokenizer(truncation=True, max_length=seq_len)` + DataCollatorForLanguageModeling
padding each batch to its longest document). A third run gives the HF Trainer
our packed blocks, to separate the packing gain from loop overhead.

"Useful tokens" are predicted non-padding targets. Throughput is measured from
the end of a warm-up step to the end of the last step, so data loading, the
optimizer and logging all count, for both.

MFU = 6 * N * tokens/s / peak, N = parameters that take part in matmuls (all
but the input embedding table). The peak is read off the device (`device_peak`):
SMs x dense bf16 FLOP per clock per SM for its compute capability x its maximum
SM clock from NVML (an H100 SXM: 132 x 4096 x 1.98 GHz), and beside it the rate a
large bf16 matmul reaches there, which no datasheet constant can overstate.
`mfu_attn` adds the attention matmuls, 12 * layers * hidden * seq_len FLOPs per
token (PaLM appendix B; it counts the full seq x seq score matrix, so it
overstates work under causal/per-document masks).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from daemon.dev.tiny_model import train_tokenizer  # noqa: E402
from daemon.jobs.specs import TrainSpec  # noqa: E402
from daemon.jobs.token_blocks import pack, tokenize_docs  # noqa: E402
from daemon.jobs.trainer import run  # noqa: E402

CONFIGS = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, seq_len, micro batch)
    "tiny": (128, 256, 2, 2, 2, 512, 128, 8),
    "small": (256, 688, 4, 4, 4, 2048, 256, 8),
    "0.5b": (1280, 3456, 20, 20, 20, 32000, 2048, 8),  # 478M parameters
}
WORDS = (
    "the of and to in is was for on that with as by at from it an be this are which or his her their river city market "
    "model data learning system paper result method train value table number people house water light music"
).split()
# Dense bf16 tensor-core FLOP per clock per SM, by compute capability (A100, H100/H200). Others: the measured matmul only.
BF16_FLOP_PER_CLOCK_PER_SM = {(8, 0): 2048, (9, 0): 4096}


def device_peak() -> dict:
    """The GPU's bf16 peak from the device itself: its SMs, its compute capability and its maximum SM clock, and the
    rate an 8192^3 bf16 matmul reaches (the mean of 10 after 3 warm-ups), so an MFU names both."""
    props = torch.cuda.get_device_properties(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        clock_hz = pynvml.nvmlDeviceGetMaxClockInfo(pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.NVML_CLOCK_SM) * 1e6
    except Exception:  # noqa: BLE001 - no NVML: the measured matmul still stands
        clock_hz = None
    per_sm = BF16_FLOP_PER_CLOCK_PER_SM.get((props.major, props.minor))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "max_sm_clock_mhz": clock_hz / 1e6 if clock_hz else None,
        "peak_flops": props.multi_processor_count * per_sm * clock_hz if per_sm and clock_hz else None,
        "matmul_flops": 10 * 2 * 8192**3 / (time.perf_counter() - t0),
    }


def documents(n: int, seed: int) -> list[str]:
    """Documents with a long-tailed length distribution (lognormal words), like web text."""
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(max(3, int(r.lognormvariate(4.0, 0.9))))) + "." for _ in range(n)]


def build_model(out: Path, cfg: tuple, texts: list[str], seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, seq_len, _ = cfg
    tok = train_tokenizer(texts[:2000], min(vocab, 4096), out)  # the model's vocab may be larger than the tokenizer's
    config = LlamaConfig(
        vocab_size=max(vocab, len(tok)),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=seq_len,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).save_pretrained(str(out), safe_serialization=True)
    return out


def matmul_params(model_dir: Path) -> tuple[int, int, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(model_dir))
    h, i, L, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h // c.num_attention_heads * c.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return per_layer * L + h * v, L, h


def production_train(policy: str, device: str, steps: int, seq_len: int | None = None, batch: int | None = None) -> dict:
    """The `train` section a round of `policy` gets (grad_accum, precision, clip, optimizer...); the bench sets only
    the step count, the device and, where given, the shape it times (seq_len, micro-batch)."""
    from policies.config import load_policy

    train = load_policy(policy).train.model_dump(mode="json")
    shape = {"seq_len": seq_len or train["seq_len"], "micro_batch_size": batch or train["micro_batch_size"]}
    return train | shape | {"max_steps": steps, "eval_interval": 10**6, "checkpoint_interval": 10**6, "device": device}


def bench_spec(model_dir: Path, data: Path, out: Path, train: dict, compile_: bool, attn: str = "auto") -> TrainSpec:
    """A round's TrainSpec on one data file at a constant LR: the schedule is the only thing a bench does not time."""
    return TrainSpec(
        parent_dir=str(model_dir),
        out_dir=str(out),
        new_path=str(data),
        schedule={"kind": "constant", "peak_lr": 3e-4},
        train=train,
        compile=compile_,
        attn_implementation=attn,
        round_id="bench",
    )


def ours(model_dir: Path, data: Path, out: Path, train: dict, warm: int, compile_: bool, attn: str) -> dict:
    run(bench_spec(model_dir, data, out, train, compile_, attn))
    ev = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    step_events = [e for e in ev if e["event"] == "step"]
    tokens = step_events[-1]["tokens"] - step_events[warm - 1]["tokens"]
    return {"useful_tokens": tokens, "seconds": step_events[-1]["time"] - step_events[warm - 1]["time"], "loss": step_events[-1]["loss"]}


def hf_trainer(
    model_dir: Path, texts: list[str], out: Path, steps: int, seq_len: int, batch: int, accum: int, device: str, warm: int, packed: bool
) -> dict:
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if packed:  # the very blocks our trainer sees (attention not masked per document: HF's default collator has no such notion)
        ids, _, tgt = pack(tokenize_docs(tok, texts), seq_len, tok.bos_token_id)
        dataset = [{"input_ids": a, "labels": b} for a, b in zip(ids, tgt)]

        def base_collate(rows):
            return {"input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}

    else:
        enc = tok([t for t in texts], truncation=True, max_length=seq_len)
        dataset = [{"input_ids": x} for x in enc["input_ids"]]
        base_collate = DataCollatorForLanguageModeling(tok, mlm=False)
    counts: list[int] = []

    def collate(rows):
        b = base_collate(rows)
        counts.append(int((b["labels"][:, 1:] != -100).sum()))
        return b

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.time())

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Clock()]).train()
    # counts[i] is micro-batch i, in order: step k's are [k * accum, (k + 1) * accum).
    return {"useful_tokens": sum(counts[warm * accum : steps * accum]), "seconds": ends[steps - 1] - ends[warm - 1]}


def main() -> None:
    ap = argparse.ArgumentParser(description="daemon.jobs.trainer vs HF Trainer, useful tokens/s")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps not timed")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the config's)")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (GPU)")
    ap.add_argument("--attn", default="auto", help="our attention implementation: auto | sdpa | flex_attention | flash_attention_2")
    ap.add_argument("--skip-hf", action="store_true", help="only our trainer (e.g. for the MFU figure)")
    ap.add_argument("--policy", default=str(Path(__file__).resolve().parents[1] / "deploy" / "policy.example.yaml"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = CONFIGS[a.config]
    seq_len, batch = cfg[6], a.batch or cfg[7]
    train = production_train(a.policy, a.device, a.steps, seq_len, batch)
    accum = train["grad_accum"]
    n_docs = a.docs or max(200, int(a.steps * batch * accum * seq_len / 60 * 1.3))  # ~60 tokens/doc on average: enough for every step
    texts = documents(n_docs, 0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model_dir = build_model(d / "model", cfg, texts)
        data = d / "docs.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        res = {"ours": ours(model_dir, data, d / "ours", train, a.warmup_steps, a.compile, a.attn)}
        if not a.skip_hf:
            for name, packed in (("hf_trainer_padded", False), ("hf_trainer_packed", True)):
                res[name] = hf_trainer(model_dir, texts, d / name, a.steps, seq_len, batch, accum, a.device, a.warmup_steps, packed)
        n_mm, layers, hidden = matmul_params(model_dir)
    for r in res.values():
        r["tokens_per_s"] = r["useful_tokens"] / r["seconds"]
    report = {
        "device": a.device,
        "config": a.config,
        "attn": a.attn,
        "compile": a.compile,
        "seq_len": seq_len,
        "batch": batch,
        "grad_accum": accum,
        "precision": train["precision"],
        "steps": a.steps,
        "timed_steps": a.steps - a.warmup_steps,
        "threads": torch.get_num_threads(),
        "matmul_params": n_mm,
        **res,
    }
    if not a.skip_hf:
        report["ratio_vs_hf_padded"] = res["ours"]["tokens_per_s"] / res["hf_trainer_padded"]["tokens_per_s"]
        report["ratio_vs_hf_packed"] = res["ours"]["tokens_per_s"] / res["hf_trainer_packed"]["tokens_per_s"]
    if a.device == "cuda":
        tps, report["gpu"] = res["ours"]["tokens_per_s"], device_peak()
        for peak in ("peak_flops", "matmul_flops"):
            if report["gpu"][peak]:
                report[f"mfu_vs_{peak}"] = 6 * n_mm * tps / report["gpu"][peak]
                report[f"mfu_attn_vs_{peak}"] = (6 * n_mm + 12 * layers * hidden * seq_len) * tps / report["gpu"][peak]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
