"""Document scoring throughput: `Replica.prompt_logprobs` against a vLLM server vs a transformers forward pass.

    python -m bench.doc_scoring [--docs 256] [--batch-size 32] [--model DIR | --pretrain-steps 300] [--url URL]
    python -m bench.doc_scoring --quality      # what the scores are worth: good vs degraded documents

Measured: documents and scored tokens per second of `prompt_logprobs` (one
`/v1/completions` request per batch, `echo` + `logprobs`), against the baseline
a user without cptd writes: the same checkpoint loaded with transformers in
this process, forward passes over padded batches of the same documents (sorted
by length, so padding is small), log-softmax and gather, in the checkpoint's
dtype on the same CPU with every core. Same documents, same truncation
(`--max-tokens`), same batch size; the first batch of each is a warm-up and is
not timed. The per-document NLLs of both are compared as a sanity check.

Without `--model` a demo-shaped Llama (daemon/dev/demo.py DEMO_SHAPE, stored in
bf16 as the demo serves it) is built in a temp dir; throughput does not depend
on what the weights learned, so it is not trained unless `--pretrain-steps` is
given (that runs the demo's pre-training, ~2-3 min for 300 steps on 2 cores).
With `--url` the server there is used (e.g. a GPU one) and `--model` must be
the local copy of the checkpoint it serves (for the baseline; `--skip-hf`
skips it).

`--quality` measures instead what the scores can select: the demo's base model
(pre-trained 300 steps unless `--model` is given) scores a buffer of good and
degraded documents that all pass the heuristic filters
(daemon/dev/degraded_corpus.py, held out from the pre-training text), and the
rule "drop documents whose robust z-score of NLL (median / 1.4826 MAD of the
buffer) is beyond k, then take the lowest NLL within the budget" is scored by
the share of good documents it picks.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from connectors.vllm import DocScore, Replica
from daemon.dev.sample_corpus import english_docs


def demo_shaped_model(root: Path, pretrain_steps: int) -> Path:
    if pretrain_steps > 0:
        from daemon.dev.demo import build_base_model

        return build_base_model(root, pretrain_steps)
    from daemon.dev.demo import DEMO_SHAPE
    from daemon.dev.sample_corpus import domain_docs
    from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama

    texts = english_docs(400, 2048, seed=1) + domain_docs(150, seed=99)
    return build_tiny_llama(root / "demo-shaped", texts, TinyLlamaShape(**DEMO_SHAPE), seed=0, dtype="bfloat16")


def hf_scores(model_dir: Path, docs: list[str], max_tokens: int, batch_size: int, dtype: str = "auto") -> tuple[list[DocScore], float]:
    """(scores in `docs` order, seconds for all batches but the first); the baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype if dtype == "auto" else getattr(torch, dtype)).eval()
    ids = [tok(d).input_ids[:max_tokens] for d in docs]
    order = sorted(range(len(docs)), key=lambda i: len(ids[i]))
    out: list[DocScore] = [DocScore(0.0, 0)] * len(docs)
    t0 = 0.0
    for b, start in enumerate(range(0, len(order), batch_size)):
        if b == 1:
            t0 = time.perf_counter()
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        x = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in idx])
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx])
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(2, x[:, 1:, None])[..., 0] * mask[:, 1:]
        for row, i in enumerate(idx):
            out[i] = DocScore(float(lp[row].sum()), len(ids[i]) - 1)
    return out, time.perf_counter() - t0


def quality(replica: Replica, args: argparse.Namespace) -> None:
    """Per-kind NLL of `degraded_buffer` (held out from the demo's pre-training text) and how well "drop robust-z
    outliers, then the lowest NLL within a budget" picks the good documents, for a 50/50 and a 60/40 buffer."""
    import random
    import statistics
    from collections import Counter

    from daemon.dev.degraded_corpus import KINDS, LABELS, degraded_buffer

    n = args.quality_docs
    buf = degraded_buffer(n, n, seed=args.seed, exclude=english_docs(400, 2048, seed=1))  # demo pre-training text
    scores = replica.prompt_logprobs([t for t, _ in buf], model=args.served_name, max_tokens_per_doc=args.max_tokens)
    rows = [(label, s.nll) for (_, label), s in zip(buf, scores, strict=True)]

    def med_mad(xs: list[float]) -> tuple[float, float]:
        m = statistics.median(xs)
        return m, statistics.median(abs(x - m) for x in xs)

    print(f"{len(rows)} documents, scored to {args.max_tokens} tokens; NLL nats/token, median / MAD per kind")
    for label in LABELS:
        m, d = med_mad([x for lab, x in rows if lab == label])
        print(f"  {label:9s} n {sum(lab == label for lab, _ in rows):4d}  median {m:.3f}  MAD {d:.3f}")
    good = [r for r in rows if r[0] == "good"]
    bad = [r for r in rows if r[0] != "good"]
    rng = random.Random(args.seed)
    per_kind = -(-2 * n // 3 // len(KINDS))
    bad_60_40 = [r for k in KINDS for r in rng.sample([b for b in bad if b[0] == k], min(per_kind, n // len(KINDS)))]
    mixes = {"50/50": good + bad, "60/40": good + bad_60_40[: 2 * n // 3]}
    for name, pool in mixes.items():
        m, d = med_mad([x for _, x in pool])
        budget = int(args.budget * len(pool))
        print(f"{name} buffer, {len(pool)} docs (median {m:.3f}, MAD {d:.3f}); budget {budget} ({args.budget:.0%}):")
        for k in (None, 3.0, 2.0):
            z = [(x - m) / (1.4826 * d or 1e-9) for _, x in pool]
            kept = [r for r, zz in zip(pool, z, strict=True) if k is None or -k <= zz <= k]
            picked = sorted(kept, key=lambda r: r[1])[:budget]
            c = Counter(lab for lab, _ in picked)
            rule = "lowest NLL" if k is None else f"drop |z| > {k:g}, lowest NLL"
            share = c["good"] / max(1, len(picked))
            print(f"  {rule:27s} precision {share:.3f}  dropped {len(pool) - len(kept):3d}  picked {dict(sorted(c.items()))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--doc-bytes", type=int, default=1500, help="target size of each document (english_docs)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=511, help="score each document's first N tokens (both sides)")
    ap.add_argument("--model", type=Path, help="checkpoint dir; default: a demo-shaped Llama built in a temp dir")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="pre-train the default model first (demo's build_base_model)")
    ap.add_argument("--url", help="an already running vLLM server serving --model")
    ap.add_argument("--served-name", help="model name on the server (default: its base model)")
    ap.add_argument("--hf-dtype", default="auto", help="baseline dtype: auto (the checkpoint's, as vLLM serves it), float32, ...")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quality", action="store_true", help="instead: NLL of good vs degraded documents and selection precision")
    ap.add_argument("--quality-docs", type=int, default=150, help="good documents (and as many degraded) for --quality")
    ap.add_argument("--budget", type=float, default=0.4, help="--quality: fraction of the buffer selected")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quality and args.model is None and args.pretrain_steps == 0:
        args.pretrain_steps = 300  # a random-init model cannot tell good text from bad

    import torch

    with tempfile.TemporaryDirectory(prefix="cptd-docscore-") as tmp:
        model_dir = args.model or demo_shaped_model(Path(tmp), args.pretrain_steps)
        server = None
        if args.url is None:
            from daemon.dev.vllm_server import VLLMServer

            server = VLLMServer(model=str(model_dir), max_model_len=args.max_tokens + 1, log_path=Path(tmp) / "vllm.log")
            server.start(timeout=400)
        try:
            replica = Replica(args.url if server is None else server.url)
            if args.quality:
                quality(replica, args)
                return
            docs = english_docs(args.docs + args.batch_size, args.doc_bytes, seed=11)
            warm, docs = docs[: args.batch_size], docs[args.batch_size :]
            replica.prompt_logprobs(warm, model=args.served_name, max_tokens_per_doc=args.max_tokens, batch_size=args.batch_size)
            t = time.perf_counter()
            scores = replica.prompt_logprobs(docs, model=args.served_name, max_tokens_per_doc=args.max_tokens, batch_size=args.batch_size)
            v_s = time.perf_counter() - t
        finally:
            if server is not None:
                server.stop()
        tokens = sum(s.tokens for s in scores)
        where = args.url or f"local vLLM CPU server, max_model_len {args.max_tokens + 1}"
        size = sum(map(len, docs)) / len(docs) / 1024
        print(f"documents: {len(docs)} of {size:.1f} KB, {tokens / len(docs):.0f} scored tokens each; {os.cpu_count()} CPUs")
        print(f"model: {model_dir}; batch {args.batch_size}; {where}")
        print(f"vLLM prompt_logprobs  {len(docs) / v_s:8.1f} docs/s  {tokens / v_s:10,.0f} tokens/s")
        if args.skip_hf:
            return
        torch.set_num_threads(os.cpu_count() or 1)
        hf, h_s = hf_scores(Path(model_dir), warm + docs, args.max_tokens, args.batch_size, args.hf_dtype)
        timed = len(warm + docs) - args.batch_size  # the first (shortest) batch is the warm-up
        hf_tokens = sum(s.tokens for s in hf) - sum(s.tokens for s in sorted(hf, key=lambda s: s.tokens)[: args.batch_size])
        threads = torch.get_num_threads()
        print(f"HF forward (baseline) {timed / h_s:8.1f} docs/s  {hf_tokens / h_s:10,.0f} tokens/s  ({threads} threads, {args.hf_dtype})")
        print(f"ratio vLLM / HF       {(tokens / v_s) / (hf_tokens / h_s):8.2f}x tokens/s")
        diffs = [abs(a.nll - b.nll) for a, b in zip(scores, hf[len(warm) :], strict=True)]
        same = sum(a.tokens == b.tokens for a, b in zip(scores, hf[len(warm) :], strict=True))
        print(
            f"agreement: per-doc NLL |vLLM - HF| max {max(diffs):.4f} mean {sum(diffs) / len(diffs):.4f} nats; "
            f"same token count {same}/{len(docs)}"
        )


if __name__ == "__main__":
    main()
