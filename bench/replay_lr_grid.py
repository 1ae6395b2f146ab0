"""The replay x learning-rate grid: do the round policies work? Ibrahim et al. 2024 (arXiv 2403.08763) at small
scale, and the drift calibration.

    .venv/bin/python -m bench.replay_lr_grid            # ~19 min on one CPU thread (2-core box); cached in --work
    .venv/bin/python -m bench.replay_lr_grid --seeds 1  # quicker

D0 (pre-training): English prose from Python's own docs (daemon.dev.sample_corpus's prose pool,
paragraphs split 90/10 into held-in and held-out before documents are composed, so no held-out paragraph
was trained on). A tiny Llama is pre-trained on it with rewarm_cosine at --pretrain-lr.
D1-weak: English paragraphs of the Debian handbook; D1-strong: its German edition (daemon.dev.multilingual_corpus).
The byte-level BPE is trained on all three corpora, so German is representable.

Per shift: one CPT round (rewarm_cosine, one epoch over D1 plus replay drawn from held-in D0) per
(replay ratio, peak LR, seed); the union baseline (same architecture from scratch on D0 x pre-training
epochs + D1, i.e. exactly the tokens pre-training plus a 0%-replay round saw); and cptd's own choice:
drift_stats(D0 model, new = D1 sample, ref = D0 held-in sample) -> adjust_for_drift(stats, DriftPolicy(LR
bounds scaled to the tiny model), ReplayPolicy()) -> one round. Reported: held-out mean token loss on D0
and D1 (the trainer's final eval, which is daemon.jobs.lm_loss.mean_token_loss), their mean, and tokens trained.

Every run is a TrainSpec run by daemon.jobs.trainer.run in this process (one torch thread); a rerun
with the same arguments reuses finished rounds (the trainer returns a finished round's result).
Writes bench/figures/replay_lr_grid.json (all numbers) and bench/figures/replay_lr_grid.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from daemon.dev import sample_corpus
from daemon.dev.multilingual_corpus import paragraphs
from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama
from daemon.jobs.drift_probe import drift_stats
from daemon.jobs.model_loader import load_causal_lm, load_tokenizer
from daemon.jobs.specs import TrainSpec
from daemon.jobs.trainer import run
from policies.drift import DriftPolicy, adjust_for_drift, drift_score, probe_sample
from policies.replay import ReplayPolicy

ROOT = Path(__file__).resolve().parents[1]
REPLAYS = (0.0, 0.01, 0.05, 0.10, 0.25, 0.50)
SHIFTS = {"weak": "en", "strong": "de"}
SHAPE = TinyLlamaShape(
    vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
)


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def d0_docs(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    pool = list(sample_corpus._prose_pool())
    random.Random(seed).shuffle(pool)
    cut = int(0.9 * len(pool))
    rng = random.Random(seed + 1)
    train = sample_corpus._compose(rng, tuple(pool[:cut]), n_train, 2048)
    heldout = sample_corpus._compose(rng, tuple(pool[cut:]), n_heldout, 600)
    return train, heldout


def d1_docs(lang: str, n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Pages split 80/20: training documents are consecutive paragraphs of a held-in page (~1.5 KB, as
    multilingual_corpus.clean_docs makes them); held-out documents are single paragraphs of held-out pages."""
    pages = list(paragraphs(lang))
    random.Random(seed).shuffle(pages)
    held_pages, train_pages = pages[: len(pages) // 5], pages[len(pages) // 5 :]
    train: list[str] = []
    for pars in train_pages:
        cur: list[str] = []
        for p in pars:
            cur.append(p)
            if sum(map(len, cur)) >= 1500 and len(cur) >= 2:
                train.append("\n\n".join(cur))
                cur = []
    random.Random(seed + 1).shuffle(train)
    heldout = [p for pg in held_pages for p in pg if len(p) >= 200]
    random.Random(seed + 2).shuffle(heldout)
    return train[:n_train], heldout[:n_heldout]


def train_section(args: argparse.Namespace, epochs: float = 1.0) -> dict:
    """The TrainSpec's `train` section of every run of the grid."""
    return {
        "seq_len": args.seq_len,
        "micro_batch_size": args.batch,
        "grad_accum": 1,
        "epochs": epochs,
        "eval_interval": 1_000_000,
        "checkpoint_interval": 1_000_000,
        "keep_checkpoints": 1,
        "eval_max_docs": 10_000,
        "device": "cpu",
        "precision": "fp32",
        "weight_decay": 0.1,
    }


def final_eval(out: Path) -> dict:
    evals = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines() if '"eval"' in line]
    evals = [e for e in evals if e.get("event") == "eval"]
    first, last = evals[0], evals[-1]
    return {
        "d0_before": first["loss_heldout_replay"],
        "d1_before": first["loss_heldout_new"],
        "d0": last["loss_heldout_replay"],
        "d1": last["loss_heldout_new"],
    }


def round_(
    args,
    work: Path,
    name: str,
    parent: Path,
    new: str,
    replay: str | None,
    ratio: float,
    lr: float,
    seed: int,
    paths,
    epochs=1.0,
    max_steps=None,
):
    out = work / "runs" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    train = train_section(args, epochs)
    if max_steps:
        train["max_steps"] = max_steps
    spec = TrainSpec(
        parent_dir=str(parent),
        out_dir=str(out),
        new_path=new,
        replay_path=replay,
        heldout_new_path=paths["d1_heldout"],
        heldout_replay_path=paths["d0_heldout"],
        replay_ratio=ratio,
        schedule={"kind": "rewarm_cosine", "peak_lr": lr, "warmup_frac": args.warmup_frac},
        train=train,
        data_seed=seed,
        init_seed=seed,
        round_id=name,
        cpu_threads=1,
    )
    t0 = time.monotonic()
    with open(out.parent / f"{name}.log", "a") as log, contextlib.redirect_stdout(log):
        res = run(spec)
    ev = final_eval(out)
    row = {"name": name, "replay": ratio, "lr": lr, "seed": seed, "tokens": res["tokens"], "steps": res["steps"], **ev}
    row["mean"] = 0.5 * (row["d0"] + row["d1"])
    row["seconds"] = round(time.monotonic() - t0, 1)
    print(
        f"  {name:40s} d0 {row['d0']:.4f} d1 {row['d1']:.4f} mean {row['mean']:.4f} tokens {row['tokens']} ({row['seconds']}s)",
        flush=True,
    )
    return row


def avg(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k in ("d0", "d1", "mean", "tokens"):
        out[k] = statistics.fmean(r[k] for r in rows)
    out["d0_sd"] = statistics.pstdev(r["d0"] for r in rows)
    out["d1_sd"] = statistics.pstdev(r["d1"] for r in rows)
    out["seeds"] = len(rows)
    return out


def table(shift: str, res: dict, lrs: list[float]) -> str:
    lines = [f"shift {shift}: held-out loss D0 / D1 / mean (nats/token), {res['seeds']} seed(s) per cell"]
    lines.append("replay  " + "".join(f"{'peak LR ' + format(lr, '.2e'):>26s}" for lr in lrs))
    for r in REPLAYS:
        cells = []
        for lr in lrs:
            c = res["grid"][f"{r}|{lr}"]
            cells.append(f"{c['d0']:.3f}/{c['d1']:.3f}/{c['mean']:.3f}")
        lines.append(f"{r * 100:5.0f}%  " + "".join(f"{c:>26s}" for c in cells))
    u, c, b = res["union"], res["cptd"], res["best"]
    lines.append(f"best fixed: replay {b['replay'] * 100:.0f}% LR {b['lr']:.2e}: {b['d0']:.3f}/{b['d1']:.3f}/{b['mean']:.3f}")
    lines.append(f"union (from scratch, D0+D1): {u['d0']:.3f}/{u['d1']:.3f}/{u['mean']:.3f}, {u['tokens']:.0f} tokens")
    lines.append(
        f"cptd (score {res['decision']['score']:.2f}, {res['decision']['level']}): replay {c['replay'] * 100:.1f}% LR {c['lr']:.2e}: "
        f"{c['d0']:.3f}/{c['d1']:.3f}/{c['mean']:.3f}, {c['tokens']:.0f} tokens = {c['tokens'] / u['tokens'] * 100:.0f}% of union"
    )
    lines.append(
        f"cptd vs best fixed {100 * (c['mean'] / b['mean'] - 1):+.2f}% (target <= +1%), "
        f"vs union {100 * (c['mean'] / u['mean'] - 1):+.2f}% (target <= +2% at <= 60% compute)"
    )
    if (g := res.get("cptd_long")) is not None:
        lines.append(
            f"cptd, {g['steps'] // res['round_steps']}x the steps: {g['d0']:.3f}/{g['d1']:.3f}/{g['mean']:.3f}, {g['tokens']:.0f} tokens = "
            f"{g['tokens'] / u['tokens'] * 100:.0f}% of union, vs union {100 * (g['mean'] / u['mean'] - 1):+.2f}%"
        )
    return "\n".join(lines)


def plot(results: dict, lrs: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.8))
    for ax, (shift, res) in zip(axes, results.items(), strict=True):
        for lr in lrs:
            cells = [res["grid"][f"{r}|{lr}"] for r in REPLAYS]
            ax.plot([c["d0"] for c in cells], [c["d1"] for c in cells], "o-", label=f"CPT peak LR {lr:.1e}", ms=4)
            for r, c in zip(REPLAYS, cells, strict=True):
                ax.annotate(f"{r * 100:g}%", (c["d0"], c["d1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        u, c = res["union"], res["cptd"]
        ax.plot([u["d0"]], [u["d1"]], "k*", ms=14, label="union (from scratch)")
        ax.plot([c["d0"]], [c["d1"]], "rD", ms=9, label=f"cptd: {c['replay'] * 100:.0f}% replay, LR {c['lr']:.1e}")
        if (g := res.get("cptd_long")) is not None:
            ax.plot(
                [g["d0"]], [g["d1"]], "D", mfc="none", mec="r", ms=9, label=f"cptd, {g['steps'] // res['round_steps']}x the round's steps"
            )
        b = res["d0_model"]  # far up the D1 axis (German: ~8.8): in the title, not on the axes
        ax.set_xlabel("held-out D0 loss (forgetting: lower is better)")
        ax.set_ylabel("held-out D1 loss (adaptation: lower is better)")
        d1_name = "English handbook" if shift == "weak" else "German handbook"
        ax.set_title(
            f"{shift} shift: D0 Python docs -> D1 {d1_name}\n(D0 model before the round: D0 {b['d0']:.2f}, D1 {b['d1']:.2f})", fontsize=10
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cptd-bench-replay-lr-grid")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--d0-docs", type=int, default=240, help="held-in D0 documents (~2 KB each)")
    ap.add_argument("--d1-docs", type=int, default=200, help="D1 training documents per shift (~1.5 KB each)")
    ap.add_argument("--heldout", type=int, default=80, help="held-out documents per set (~600 chars each)")
    ap.add_argument("--pretrain-epochs", type=float, default=4.0)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--lr-mults", default="0.5,1,2", help="CPT peak LRs as multiples of --pretrain-lr")
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--long-round", type=int, default=3, help="also run cptd's choice with this many times the round's steps")
    ap.add_argument("--shifts", default="weak,strong")
    ap.add_argument("--out", default=str(ROOT / "bench" / "figures"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.monotonic()
    work = Path(args.work)
    shifts = args.shifts.split(",")
    lrs = [args.pretrain_lr * float(m) for m in args.lr_mults.split(",")]

    d0_train, d0_held = d0_docs(args.d0_docs, args.heldout)
    d1 = {s: d1_docs(SHIFTS[s], args.d1_docs, args.heldout) for s in shifts}
    data = work / "data"
    paths = {"d0_train": write_jsonl(data / "d0_train.jsonl", d0_train), "d0_heldout": write_jsonl(data / "d0_heldout.jsonl", d0_held)}
    for s in shifts:
        paths[f"{s}_train"] = write_jsonl(data / f"{s}_train.jsonl", d1[s][0])
        paths[f"{s}_heldout"] = write_jsonl(data / f"{s}_heldout.jsonl", d1[s][1])
        paths[f"{s}_union"] = write_jsonl(data / f"{s}_union.jsonl", d0_train * round(args.pretrain_epochs) + d1[s][0])
    print(
        f"data: D0 {len(d0_train)} docs {sum(map(len, d0_train))} chars; "
        + "; ".join(f"D1-{s} {len(d1[s][0])} docs {sum(map(len, d1[s][0]))} chars, held-out {len(d1[s][1])}" for s in shifts),
        flush=True,
    )

    init = work / "init"
    if not (init / "model.safetensors").exists():
        texts = d0_train + [t for s in shifts for t in d1[s][0]]
        build_tiny_llama(init, texts, SHAPE, seed=0)
    # Pre-training on D0 (the held-out "new" set is the first shift's, so its step-0/final evals mean something).
    pre_paths = {"d0_heldout": paths["d0_heldout"], "d1_heldout": paths[f"{shifts[0]}_heldout"]}
    print("pre-training on D0", flush=True)
    pre = round_(args, work, "pretrain-d0", init, paths["d0_train"], None, 0.0, args.pretrain_lr, 0, pre_paths, epochs=args.pretrain_epochs)
    d0_model = work / "runs" / "pretrain-d0" / "final"

    # cptd's LR bounds, scaled: the defaults (1.5e-4 .. 3e-4) are half and all of a real model's pre-training peak.
    drift_policy = DriftPolicy(peak_lr_min=0.5 * args.pretrain_lr, peak_lr_max=args.pretrain_lr)
    replay_policy = ReplayPolicy()
    model, tok = load_causal_lm(str(d0_model), device="cpu"), load_tokenizer(str(d0_model))
    decisions, sps, budget = {}, {}, {}
    for s in shifts:
        sps[s] = {"d0_heldout": paths["d0_heldout"], "d1_heldout": paths[f"{s}_heldout"]}
        stats = drift_stats(model, tok, probe_sample(d1[s][0], 64, 0), probe_sample(d0_train, 64, 1), max_len=args.seq_len)
        decisions[s] = dec = adjust_for_drift(stats, drift_policy, replay_policy)
        print(f"shift {s}: drift {json.dumps(dec.to_record()['stats'])} -> score {drift_score(stats, drift_policy):.3f}", flush=True)
        print(f"  decision: level {dec.level} replay {dec.replay_ratio:.3f} peak LR {dec.peak_lr:.2e} warmup {dec.warmup_frac}", flush=True)
        # Fixed compute per round (the paper's setting): the steps of one epoch of D1 alone; replay takes its share of them.
        n_tok = sum(len(ids) + 2 for ids in tok(d1[s][0], add_special_tokens=False)["input_ids"])
        budget[s] = max(1, n_tok // args.seq_len // args.batch)
    cells: dict = {s: {} for s in shifts}
    cptd_rows: dict = {s: [] for s in shifts}
    union_rows: dict = {s: [] for s in shifts}
    long_rows: dict = {s: [] for s in shifts}
    for seed in range(args.seeds):  # seed-major, so an interrupted run leaves whole seeds behind (rerun with --seeds N reuses them)
        for s in shifts:
            new, sp, dec, ms = paths[f"{s}_train"], sps[s], decisions[s], budget[s]
            for lr in lrs:
                for r in REPLAYS:
                    row = round_(
                        args, work, f"{s}-r{r}-lr{lr:.2e}-s{seed}", d0_model, new, paths["d0_train"], r, lr, seed, sp, max_steps=ms
                    )
                    cells[s].setdefault(f"{r}|{lr}", []).append(row)
            cptd_rows[s].append(
                round_(
                    args, work, f"{s}-cptd-s{seed}", d0_model, new, paths["d0_train"], dec.replay_ratio, dec.peak_lr, seed, sp, max_steps=ms
                )
            )
            if args.long_round > 1:  # the same choice with more compute (more epochs over D1): how close to the union it gets
                long_rows[s].append(
                    round_(
                        args,
                        work,
                        f"{s}-cptd-x{args.long_round}-s{seed}",
                        d0_model,
                        new,
                        paths["d0_train"],
                        dec.replay_ratio,
                        dec.peak_lr,
                        seed,
                        sp,
                        max_steps=ms * args.long_round,
                    )
                )
            union_rows[s].append(
                round_(args, work, f"{s}-union-s{seed}", init, paths[f"{s}_union"], None, 0.0, args.pretrain_lr, seed, sp, epochs=1.0)
            )
    results: dict = {}
    for s in shifts:
        grid = {k: avg(v) for k, v in cells[s].items()}
        ev = cptd_rows[s][0]
        results[s] = {
            "seeds": args.seeds,
            "round_steps": budget[s],
            "decision": decisions[s].to_record(),
            "grid": grid,
            "best": min(grid.values(), key=lambda c: c["mean"]),
            "cptd": avg(cptd_rows[s]),
            "union": avg(union_rows[s]),
            "cptd_long": avg(long_rows[s]) if long_rows[s] else None,
            "d0_model": {"d0": ev["d0_before"], "d1": ev["d1_before"]},
        }
    for s in shifts:
        print(table(s, results[s], lrs))
    seconds = time.monotonic() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "args": vars(args),
        "shape": asdict(SHAPE),
        "pretrain": pre,
        "lrs": lrs,
        "drift_policy": drift_policy.model_dump(),
        "replay_policy": replay_policy.model_dump(),
        "results": results,
        "seconds": round(seconds, 1),
    }
    (out / "replay_lr_grid.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(results, lrs, out / "replay_lr_grid.png")
    print(f"total {seconds:.0f}s; wrote {out / 'replay_lr_grid.json'} and {out / 'replay_lr_grid.png'}")


if __name__ == "__main__":
    main()
