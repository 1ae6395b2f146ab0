"""`cptd rater-train`: a document rater fitted to pointwise ratings, with its held-out agreement and lineage.

DataMan rates documents with a strong LLM once and trains a cheap rater on
those ratings; the operator does the same here with any LLM's ratings. The
ratings are the file's; this job only fits and measures:

* `head`: features of the served model's own forward pass (daemon/jobs/rater_head.py) and small heads on them,
  written to `<served>/rater/` (head.safetensors + rater.json);
* `classifier`: the served model itself fine-tuned as a sequence classifier (criteria as sigmoid regression
  outputs, domains as classes), a Hugging Face model directory the `classifier` backend reads.

A held-out share of the valid lines (`holdout`, never trained on) gives the
agreement figures written into rater.json and printed by the command: MAE and
accuracy of rounded ratings per criterion, domain accuracy, and the AUC of the
predicted overall score for documents rated above the scale's middle against
the rest. Malformed lines are named and skipped; too few valid ones is a refusal.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from daemon.jobs.model_loader import DTYPES, checkpoint_dtype, dtype_name, load_causal_lm, load_tokenizer, resolve_device
from daemon.jobs.rater_head import Annotation, HeadConfig, RaterHead, document_features, rating_loss, rating_targets, ratings, save_head
from daemon.jobs.specs import RaterTrainSpec, write_result
from policies.rating import OVERALL


def parse_annotations(path: Path, criteria: list[str], domains: list[str], scale: int) -> tuple[list[Annotation], list[dict[str, Any]]]:
    """(valid annotations, [{"line", "reason"}] of the skipped ones). A line needs a text and an overall rating."""
    good: list[Annotation] = []
    skipped: list[dict[str, Any]] = []
    for n, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        why = None
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            skipped.append({"line": n, "reason": f"invalid JSON: {e.msg}"})
            continue
        if not isinstance(obj, dict):
            why = "not a JSON object"
        elif not isinstance(obj.get("text"), str) or not obj["text"].strip():
            why = "no text"
        else:
            rates = dict(obj.get("ratings") or {}) if isinstance(obj.get("ratings") or {}, dict) else None
            if rates is None:
                why = "ratings is not an object"
            else:
                if OVERALL in obj:
                    rates.setdefault(OVERALL, obj[OVERALL])
                unknown = sorted(set(rates) - set(criteria))
                bad = sorted(k for k, v in rates.items() if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v <= scale)
                dom = obj.get("domain")
                if unknown:
                    why = f"unknown criteria {unknown}"
                elif bad:
                    why = f"ratings outside 1..{scale}: {bad}"
                elif OVERALL not in rates:
                    why = "no overall rating"
                elif dom is not None and dom not in domains:
                    why = f"unknown domain {dom!r}"
                else:
                    good.append(Annotation(n, obj["text"], {k: float(v) for k, v in rates.items()}, dom))
        if why:
            skipped.append({"line": n, "reason": why})
    return good, skipped


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a positive scores above a negative), ties half: the Mann-Whitney form."""
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def agreement(truth: list[Annotation], pred: list[dict[str, Any]], criteria: list[str], scale: int) -> dict[str, Any]:
    per: dict[str, dict[str, float]] = {}
    for c in criteria:
        pairs = [(a.ratings[c], p["criteria"][c]) for a, p in zip(truth, pred, strict=True) if c in a.ratings and c in p["criteria"]]
        if pairs:
            per[c] = {
                "n": len(pairs),
                "mae": round(sum(abs(t - q) for t, q in pairs) / len(pairs), 4),
                "accuracy": round(sum(round(t) == round(q) for t, q in pairs) / len(pairs), 4),
            }
    doms = [(a.domain, p["domain"]) for a, p in zip(truth, pred, strict=True) if a.domain is not None]
    mid = (1 + scale) / 2
    pos = [p["overall"] for a, p in zip(truth, pred, strict=True) if a.ratings[OVERALL] > mid]
    neg = [p["overall"] for a, p in zip(truth, pred, strict=True) if a.ratings[OVERALL] <= mid]
    a = auc(pos, neg)
    return {
        "heldout": len(truth),
        "criteria": per,
        "domain_accuracy": round(sum(t == q for t, q in doms) / len(doms), 4) if doms else None,
        "overall_auc": None if a is None else round(a, 4),
    }


def fit_head(x: torch.Tensor, anns: list[Annotation], cfg: HeadConfig, steps: int, lr: float, seed: int) -> RaterHead:
    """Full-batch AdamW on standardized features; weight decay keeps a few hundred ratings from being memorised."""
    torch.manual_seed(seed)
    head = RaterHead(cfg)
    head.get_buffer("mean").copy_(x.mean(0))
    head.get_buffer("std").copy_(x.std(0).clamp(min=1e-4) if len(x) > 1 else torch.ones(x.shape[1]))
    y, m, d = rating_targets(anns, cfg.criteria, cfg.domains, cfg.scale)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.5)
    head.train()
    for _ in range(steps):
        opt.zero_grad()
        crit, dom = head(x)
        rating_loss(crit, dom, y, m, d).backward()
        opt.step()
    return head.eval()


def _features(spec: RaterTrainSpec, device: torch.device, texts: list[str]) -> tuple[torch.Tensor, list[str | None]]:
    dtype = DTYPES[spec.dtype] if spec.dtype else checkpoint_dtype(spec.served)
    model = load_causal_lm(spec.served, device=device, dtype=dtype, adapter=spec.adapter)
    feats, errors = document_features(model, load_tokenizer(spec.served), texts, spec.max_len, spec.batch_size)
    width = len(next(f for f in feats if f is not None))
    return torch.tensor([f if f is not None else [0.0] * width for f in feats], dtype=torch.float32), errors


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def served_digest(served: Path) -> str:
    """Names the served weights the rater was fitted to: sha256 over its safetensors files' names and bytes."""
    h = hashlib.sha256()
    for p in sorted(served.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(_sha256(p).encode())
    return h.hexdigest()[:16]


def train(spec: RaterTrainSpec, device: torch.device) -> dict[str, Any]:
    anns, skipped = parse_annotations(Path(spec.annotations), spec.criteria, spec.domains, spec.scale)
    out: dict[str, Any] = {"skipped": skipped, "valid": len(anns), "refusal": None, "out_dir": spec.out_dir, "backend": spec.backend}
    if len(anns) < spec.min_annotations:
        out["refusal"] = f"{len(anns)} valid annotation lines (of {len(anns) + len(skipped)}); at least {spec.min_annotations} are needed"
        return out
    # Only what was rated is predicted: a criterion nobody rated would be a head trained on nothing.
    criteria = [c for c in spec.criteria if any(c in a.ratings for a in anns)]
    domains = [d for d in spec.domains if any(a.domain == d for a in anns)]
    order = list(range(len(anns)))
    random.Random(spec.seed).shuffle(order)
    n_held = max(1, round(spec.holdout * len(anns))) if spec.holdout > 0 else 0
    held, fit = [anns[i] for i in order[:n_held]], [anns[i] for i in order[n_held:]]
    out.update(train=len(fit), heldout=len(held), criteria=criteria, domains=domains)
    lineage = {
        "served": str(Path(spec.served).resolve()),
        "served_digest": served_digest(Path(spec.served)),
        "adapter": spec.adapter,
        "annotations": str(Path(spec.annotations).resolve()),
        "annotations_sha256": _sha256(Path(spec.annotations)),
        "backend": spec.backend,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_lines": len(fit),
        "heldout_lines": len(held),
    }
    cfg = HeadConfig(
        criteria=criteria, domains=domains, scale=spec.scale, features=0, hidden=spec.hidden, max_len=spec.max_len,
        dtype=spec.dtype or dtype_name(checkpoint_dtype(spec.served)),
    )  # fmt: skip
    if spec.backend == "head":
        x, errors = _features(spec, device, [a.text for a in fit + held])
        bad = {i for i, e in enumerate(errors) if e}
        for i in sorted(bad):
            skipped.append({"line": (fit + held)[i].line, "reason": f"not featurized: {errors[i]}"})
        keep_fit = [i for i in range(len(fit)) if i not in bad]
        keep_held = [i for i in range(len(fit), len(fit) + len(held)) if i not in bad]
        cfg.features = x.shape[1]
        head = fit_head(x[keep_fit], [fit[i] for i in keep_fit], cfg, spec.epochs or 400, spec.lr or 1e-2, spec.seed)
        pred = ratings(head, cfg, x[keep_held]) if keep_held else []
        cfg.agreement = agreement([held[i - len(fit)] for i in keep_held], pred, criteria, spec.scale) if keep_held else {}
        cfg.lineage = lineage
        save_head(head, cfg, Path(spec.out_dir))
    else:
        from daemon.jobs.document_classifier import fine_tune, write_classifier

        model, tok = fine_tune(spec, device, fit, criteria, domains)
        pred = _classifier_ratings(model, tok, cfg, [a.text for a in held], spec)
        cfg.agreement = agreement(held, pred, criteria, spec.scale) if held else {}
        cfg.lineage = lineage
        write_classifier(model, tok, cfg, Path(spec.out_dir))
    out["agreement"] = cfg.agreement
    return out


def _classifier_ratings(model: Any, tok: Any, cfg: HeadConfig, texts: list[str], spec: RaterTrainSpec) -> list[dict[str, Any]]:
    from daemon.jobs.document_classifier import classify

    rows, _ = classify(model, tok, cfg, texts, spec.max_len, spec.batch_size)
    return [r or {"overall": 1.0, "criteria": {}, "domain": None} for r in rows]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.rater_training SPEC.json")
    spec = RaterTrainSpec.read(argv[0])
    device = resolve_device(spec.device)
    t0 = time.monotonic()
    out = train(spec, device)
    write_result(spec.result_file, {**out, "device": str(device), "seconds": round(time.monotonic() - t0, 3)})


if __name__ == "__main__":
    main()
