"""Ratings of a round's candidate pool by the `head` or `classifier` rater (policies/rating.py), on the trainer's device.

Like the generated-text detector, this is a job: the daemon has no torch and
the served model may need the GPU. One row per document, in input order:
{"key", "overall", "criteria", "domain"}, or {"key", "error"} for a document
that could not be rated (the round decides what happens to it, `on_error`);
only a rater that cannot be loaded at all fails the job. Criteria are those
the spec asks for that the rater knows (overall always); a domain outside the
spec's list is reported as None.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from daemon.jobs.model_loader import DTYPES, load_causal_lm, load_tokenizer, resolve_device
from daemon.jobs.specs import RaterSpec, write_result
from policies.rating import OVERALL


def head_dir(spec: RaterSpec) -> Path:
    if spec.path:
        return Path(spec.path)
    if not spec.served:
        raise ValueError("backend head needs `served` (the served checkpoint) or `path` (the head directory)")
    return Path(spec.served) / "rater"


def rate_with_head(spec: RaterSpec, texts: list[str], device: torch.device) -> tuple[list[dict[str, Any] | None], list[str | None]]:
    from daemon.jobs.rater_head import document_features, load_head, ratings

    if not spec.served:
        raise ValueError("backend head needs `served`: the head reads the served model's hidden states")
    head, cfg = load_head(head_dir(spec))
    dtype = spec.dtype or cfg.dtype  # the dtype the head was fitted under, unless the spec says otherwise
    model = load_causal_lm(spec.served, device=device, dtype=DTYPES[dtype] if dtype else None, adapter=spec.adapter)
    feats, errors = document_features(model, load_tokenizer(spec.served), texts, min(spec.max_len, cfg.max_len), spec.batch_size)
    ok = [i for i, f in enumerate(feats) if f is not None]
    rows: list[dict[str, Any] | None] = [None] * len(texts)
    if ok:
        for i, r in zip(ok, ratings(head, cfg, torch.tensor([feats[i] for i in ok], dtype=torch.float32)), strict=True):
            rows[i] = r
    return rows, errors


def rate_with_classifier(spec: RaterSpec, texts: list[str], device: torch.device) -> tuple[list[dict[str, Any] | None], list[str | None]]:
    from daemon.jobs.document_classifier import classify, load_classifier, output_map

    if not spec.path:
        raise ValueError("backend classifier needs `path` (the model directory)")
    model, tok = load_classifier(Path(spec.path), device, DTYPES[spec.dtype] if spec.dtype else None)
    omap = output_map(model, Path(spec.path), spec.criteria, spec.scale)
    return classify(model, tok, omap, texts, spec.max_len, spec.batch_size)


def as_row(key: Any, rating: dict[str, Any] | None, error: str | None, spec: RaterSpec) -> dict[str, Any]:
    if rating is None:
        return {"key": key, "error": error or "not rated"}
    crit = {c: v for c, v in rating["criteria"].items() if c in spec.criteria or c == OVERALL}
    domain = rating["domain"] if rating["domain"] in spec.domains else None
    return {"key": key, "overall": rating["overall"], "criteria": crit, "domain": domain}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.document_rater SPEC.json")
    spec = RaterSpec.read(argv[0])
    device = resolve_device(spec.device)
    t0 = time.monotonic()
    docs = [json.loads(line) for line in Path(spec.docs_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [d["text"] if isinstance(d.get("text"), str) else "" for d in docs]
    rate = rate_with_head if spec.backend == "head" else rate_with_classifier
    rows, errors = rate(spec, texts, device)
    write_result(
        spec.result_file,
        {
            "rows": [as_row(d.get("key"), r, e, spec) for d, r, e in zip(docs, rows, errors, strict=True)],
            "docs": len(docs),
            "device": str(device),
            "seconds": round(time.monotonic() - t0, 3),
        },
    )


if __name__ == "__main__":
    main()
