"""What the raters select: perplexity vs the trained head vs the classifier on the labelled buffer, then training on it.

    python -m bench.rater_quality [--model DIR] [--splits 5] [--seeds 3] [--steps 40] [--skip-rounds] [--no-classifier] [--workdir W]
    python -m bench.rater_quality --model W/english/checkpoints/base --head-ratings W/rated-head.json   # rounds only

1. Annotations derived from the labelled buffer's labels (daemon/dev/degraded_corpus.py DERIVED_RATINGS) for
   `--train-docs` good and as many degraded documents train `cptd rater-train` (head, then classifier).
2. A second buffer, never trained on (`--test-docs` good and as many degraded), is rated by each: the perplexity
   baseline (mean token NLL under the served model, lower is better, as `curation.select: score` ranks), the head
   and the classifier (overall score, higher is better). Printed: AUC of good vs each degradation kind and vs all,
   and the precision of the top `--budget` share of the buffer.
3. Rounds: the trainer job (the round's, run directly) on the top of each rater in `--picks` (the head's overall by
   default; perplexity's lowest NLL) within the budget, and on a random pick of the same size, for `--seeds` seeds
   each; held-out loss on clean prose (never in either buffer), with the run-to-run spread.
4. `--splits K` repeats 1 and 2 on K pairs of buffers (split k: seeds 2k + 1 for the test buffer, drawn first,
   and 2k for the training one) and prints each figure's mean and lowest over them: one 120-document test buffer
   moves a rater's AUC by a few hundredths. The rounds use split 0.

Without `--model` the curation tests' English model (demo-shaped Llama, 200 pre-training steps, bf16) is built.
Both pre-training text and both buffers are disjoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon.dev.degraded_corpus import KINDS, annotation_lines, degraded_buffer
from daemon.dev.sample_corpus import english_docs
from daemon.jobs.rater_training import auc
from daemon.jobs.specs import RaterSpec, TrainSpec
from policies.rating import DATAMAN_CRITERIA, DATAMAN_DOMAINS


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.perf_counter() - t


def rated(tmp: Path, backend: str, model: Path, rater: Path, texts: list[str], max_len: int) -> tuple[list[float], float]:
    docs = tmp / f"docs-{backend}.jsonl"
    docs.write_text("".join(json.dumps({"key": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    spec = RaterSpec(
        backend=backend, docs_path=str(docs), out=str(tmp / f"rated-{backend}.json"), criteria=list(DATAMAN_CRITERIA),
        domains=list(DATAMAN_DOMAINS), served=str(model), path=str(rater), max_len=max_len,
    )  # fmt: skip
    _run([sys.executable, "-m", spec.module, str(spec.write(tmp / f"spec-{backend}.json"))])
    res = json.loads(spec.result_file.read_text())
    return [r.get("overall", 0.0) for r in res["rows"]], res["seconds"] / len(texts)


def perplexity(model: Path, texts: list[str], max_len: int) -> list[float]:
    """Mean token NLL per document (the curation's perplexity score, computed with transformers instead of vLLM)."""
    import torch

    from daemon.jobs.lm_loss import mean_token_loss
    from daemon.jobs.model_loader import load_causal_lm, load_tokenizer

    m, tok = load_causal_lm(model, device="cpu", dtype=torch.float32), load_tokenizer(model)
    return [mean_token_loss(m, tok, [t], max_len=max_len).mean_nll for t in texts]


def cells(score: list[float], labels: list[str], budgets: list[float]) -> list[float]:
    """AUC of good vs each kind and vs all, then the precision of the top share at each budget."""
    good = [s for s, lab in zip(score, labels, strict=True) if lab == "good"]
    out = [auc(good, [s for s, lab in zip(score, labels, strict=True) if lab == k]) or 0.0 for k in KINDS]
    out.append(auc(good, [s for s, lab in zip(score, labels, strict=True) if lab != "good"]) or 0.0)
    order = sorted(range(len(score)), key=lambda i: -score[i])
    return out + [sum(labels[i] == "good" for i in order[: int(b * len(score))]) / int(b * len(score)) for b in budgets]


def row(name: str, values: list[float]) -> str:
    return f"{name:12s}" + "".join(f"{c:10.3f}" for c in values)


def heldout_loss(model_dir: Path, texts: list[str]) -> float:
    import torch

    from daemon.jobs.lm_loss import mean_token_loss
    from daemon.jobs.model_loader import load_causal_lm, load_tokenizer

    m = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
    return mean_token_loss(m, load_tokenizer(model_dir), texts, max_len=256).mean_nll


def train_on(tmp: Path, model: Path, texts: list[str], name: str, seed: int, steps: int, grad_accum: int = 4) -> Path:
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = TrainSpec(
        parent_dir=str(model), out_dir=str(tmp / name), new_path=str(data),
        schedule={"kind": "rewarm_cosine", "peak_lr": 6e-4, "warmup_frac": 0.1},
        train={"seq_len": 128, "max_steps": steps, "grad_accum": grad_accum, "eval_interval": 10**6, "checkpoint_interval": 10**6,
               "device": "cpu"},
        data_seed=seed, init_seed=seed, round_id=name, cpu_threads=1,
    )  # fmt: skip
    _run([sys.executable, "-m", spec.module, str(spec.write(tmp / f"{name}-spec.json"))])
    return tmp / name / "final"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="served checkpoint (default: the curation tests' English model, built)")
    ap.add_argument("--train-docs", type=int, default=300, help="good documents annotated (and as many degraded)")
    ap.add_argument("--test-docs", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.3, help="share of the test buffer chosen (precision, rounds)")
    ap.add_argument("--classifier-epochs", type=int, default=3)
    ap.add_argument("--splits", type=int, default=1, help="train/test buffer pairs the raters are fitted and measured on")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--picks", default="head", help="raters whose top the rounds train on, each against the random pick: head,perplexity,classifier"
    )
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of each round")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches (8 x 128 tokens) per step of each round")
    ap.add_argument("--skip-rounds", action="store_true")
    ap.add_argument("--head-ratings", type=Path, help="only the rounds, on a previous run's head ratings (its rated-head.json)")
    ap.add_argument("--no-classifier", action="store_true", help="rate with the head and perplexity only")
    ap.add_argument("--workdir", type=Path, help="keep the model, raters, ratings and rounds here (default: a temporary dir)")
    args = ap.parse_args()
    raters = {"head", "perplexity"} | (set() if args.no_classifier else {"classifier"})
    if not set(args.picks.split(",")) <= raters:
        ap.error(f"--picks {args.picks}: each of {sorted(raters)}")
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cptd-rater-bench-")))
        tmp.mkdir(parents=True, exist_ok=True)
        if args.model is None:
            from daemon.dev.demo import build_base_model

            args.model = build_base_model(tmp / "english", 200)
        pretrain = english_docs(400, 2048, seed=1)
        # The rounds' held-out clean text comes first, and neither buffer may use its paragraphs: a degraded document
        # (shuffled sentences, stuffed or noised paragraphs) of a paragraph that is also in the held-out text would
        # teach the random pick the held-out text itself.
        clean = [t for t, _ in degraded_buffer(40, 0, seed=99, exclude=pretrain)]
        budgets = sorted({args.budget, 0.4, 0.5})
        runs: dict[str, list[list[float]]] = {}
        print("AUC of good vs each kind and vs all; precision of the top share of the buffer (by rating; perplexity: lowest NLL)")
        for split in range(args.splits):
            # The test buffer first, so that it keeps the pool's variety: the rounds train on it. The training buffer,
            # drawn from what is left, reuses paragraphs between its documents; it shares none with the test buffer.
            test = degraded_buffer(args.test_docs, args.test_docs, seed=2 * split + 1, exclude=pretrain + clean)
            texts, labels = [t for t, _ in test], [lab for _, lab in test]
            if args.head_ratings:
                rounds(args, tmp, texts, {"head": [r["overall"] for r in json.loads(args.head_ratings.read_text())["rows"]]}, clean)
                return
            train = degraded_buffer(args.train_docs, args.train_docs, seed=2 * split, exclude=pretrain + clean + [t for t, _ in test])
            d = tmp if split == 0 else tmp / f"split-{split}"
            d.mkdir(exist_ok=True)
            scores, seconds = rate_split(args, d, train, texts)
            print(f"split {split}: {args.model}; {2 * args.train_docs} annotated documents, {len(test)} others rated (50/50)")
            print(f"{'':12s}" + "".join(f"{k:>10s}" for k in (*KINDS, "all")) + "".join(f"{f'prec@{b:.0%}':>10s}" for b in budgets))
            for name, score in scores.items():
                runs.setdefault(name, []).append(cells(score, labels, budgets))
                print(row(name, runs[name][-1]))
            print(seconds, flush=True)
            if split == 0:
                picked = (texts, {name: scores[name] for name in args.picks.split(",")})
        if args.splits > 1:
            print(f"over {args.splits} splits: mean, then the lowest")
            for name, per in runs.items():
                print(row(f"{name} mean", [statistics.mean(c) for c in zip(*per, strict=True)]))
                print(row(f"{name} min", [min(c) for c in zip(*per, strict=True)]))
        if not args.skip_rounds:
            rounds(args, tmp, *picked, clean)


def rate_split(args: argparse.Namespace, tmp: Path, train: list[tuple[str, str]], texts: list[str]) -> tuple[dict[str, list[float]], str]:
    """Fit the raters on `train`'s derived annotations, then rate `texts` with each and with perplexity."""
    ann = tmp / "annotations.jsonl"
    ann.write_text("".join(json.dumps(a) + "\n" for a in annotation_lines(train)))
    common = ["--annotations", str(ann), "--served", str(args.model), "--max-len", str(args.max_len), "--holdout", "0.1"]
    fit = {"head": _run([sys.executable, "-m", "daemon.cli", "rater-train", *common, "--out", str(tmp / "head"), "--dtype", "float32"])}
    if not args.no_classifier:
        fit["classifier"] = _run([sys.executable, "-m", "daemon.cli", "rater-train", *common, "--out", str(tmp / "clf"),
                                  "--backend", "classifier", "--epochs", str(args.classifier_epochs)])  # fmt: skip
    t = time.perf_counter()
    scores = {"perplexity": [-x for x in perplexity(args.model, texts, args.max_len)]}
    secs = {"perplexity (HF, fp32)": (time.perf_counter() - t) / len(texts)}
    scores["head"], secs["head"] = rated(tmp, "head", args.model, tmp / "head", texts, args.max_len)
    if not args.no_classifier:
        scores["classifier"], secs["classifier"] = rated(tmp, "classifier", args.model, tmp / "clf", texts, args.max_len)
    return scores, (
        "seconds per document (rating job, CPU, incl. load): " + ", ".join(f"{k} {v:.3f}" for k, v in secs.items())
        + "; rater-train wall time (incl. features / fine-tuning): " + ", ".join(f"{k} {v:.0f} s" for k, v in fit.items())
    )  # fmt: skip


def rounds(args: argparse.Namespace, tmp: Path, texts: list[str], scores: dict[str, list[float]], clean: list[str]) -> None:
    """The trainer job on each rater's top within the budget vs a random pick of the same size, per seed."""
    n = int(args.budget * len(texts))
    base = heldout_loss(args.model, clean)
    tops = {name: [texts[i] for i in sorted(range(len(texts)), key=lambda i: -score[i])[:n]] for name, score in scores.items()}
    loss: dict[str, list[float]] = {name: [] for name in [*scores, "random"]}
    for seed in range(args.seeds):
        for name, chosen in {**tops, "random": random.Random(100 + seed).sample(texts, n)}.items():
            loss[name].append(heldout_loss(train_on(tmp, args.model, chosen, f"{name}-{seed}", seed, args.steps, args.grad_accum), clean))
        print(f"seed {seed}: held-out loss, " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in loss.items()), flush=True)
    rnd = loss.pop("random")
    print(
        f"held-out loss on {len(clean)} clean documents (base {base:.4f}), {n} documents, {args.steps} steps, {args.seeds} seeds: "
        f"random pick {statistics.mean(rnd):.4f} ± {statistics.pstdev(rnd):.4f}"
    )
    for name, sel in loss.items():
        spread = max(statistics.pstdev(sel), statistics.pstdev(rnd))
        margin = statistics.mean(rnd) - statistics.mean(sel)
        lower = sum(a < b for a, b in zip(sel, rnd, strict=True))
        print(
            f"  {name}'s pick {statistics.mean(sel):.4f} ± {statistics.pstdev(sel):.4f}; margin {margin:.4f} nats = "
            f"{margin / (spread or 1e-9):.1f}x the larger spread; lower in {lower}/{args.seeds} paired seeds"
        )


if __name__ == "__main__":
    main()
