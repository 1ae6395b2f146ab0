"""The `classifier` rater: a Hugging Face sequence-classification model, its outputs mapped to ratings.

Teams often have a quality classifier already; the rater reads it as it is.
Three layouts, decided from the model directory:

* written by `cptd rater-train --backend classifier` (rater.json beside the weights): one sigmoid output per
  criterion (rating = 1 + (scale - 1) * sigmoid), then one logit per domain;
* a regression model whose labels (config.json `id2label`) are criteria names, overall among them: the outputs
  are the ratings, clipped to 1..scale;
* any other classifier: its classes are taken as ordered quality levels (class 0 worst), and overall is the
  expected level mapped onto 1..scale (a binary good/bad classifier gives 1 + (scale - 1) * P(good)).

Inputs are truncated to `max_len` tokens; every output is computed in fp32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from daemon.jobs.rater_head import HEAD_CONFIG, Annotation, HeadConfig, in_batches, rating_loss, rating_targets
from policies.rating import OVERALL

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from daemon.jobs.specs import RaterTrainSpec


@dataclass
class OutputMap:
    kind: str  # "rater" (rater-train's layout), "regression" (labels are criteria), "ordinal" (quality classes)
    criteria: list[str]
    domains: list[str]
    scale: int


def output_map(model: PreTrainedModel, path: Path, criteria: Sequence[str], scale: int) -> OutputMap:
    if (path / HEAD_CONFIG).exists():
        cfg = HeadConfig(**json.loads((path / HEAD_CONFIG).read_text(encoding="utf-8")))
        return OutputMap("rater", cfg.criteria, cfg.domains, cfg.scale)
    id2label: dict[Any, Any] = dict(model.config.id2label or {})
    labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(int(model.config.num_labels or 0))]
    if model.config.problem_type == "regression" or set(labels) <= set(criteria):
        if OVERALL not in labels:
            raise ValueError(f"{path}: a regression classifier must have an {OVERALL!r} output (its labels: {labels})")
        return OutputMap("regression", labels, [], scale)
    return OutputMap("ordinal", [OVERALL], [], scale)


def _rows(out: OutputMap, logits: torch.Tensor) -> list[dict[str, Any]]:
    logits = logits.float()
    rows = []
    for z in logits:
        if out.kind == "rater":
            k = len(out.criteria)
            vals = (1 + (out.scale - 1) * torch.sigmoid(z[:k])).tolist()
            domain = out.domains[int(z[k:].argmax())] if out.domains else None
        elif out.kind == "regression":
            vals, domain = z.clamp(1, out.scale).tolist(), None
        else:
            p = torch.softmax(z, -1)
            level = float((p * torch.arange(len(z), dtype=torch.float32)).sum()) / max(1, len(z) - 1)
            vals, domain = [1 + (out.scale - 1) * level], None
        crit = {c: round(float(v), 4) for c, v in zip(out.criteria, vals, strict=True)}
        rows.append({"overall": crit[OVERALL], "criteria": crit, "domain": domain})
    return rows


def classify(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: OutputMap | HeadConfig, texts: Sequence[str], max_len: int, batch_size: int
) -> tuple[list[dict[str, Any] | None], list[str | None]]:
    """(rating rows or None, error or None) per text."""
    omap = out if isinstance(out, OutputMap) else OutputMap("rater", out.criteria, out.domains, out.scale)
    dev = next(model.parameters()).device
    rows: list[dict[str, Any] | None] = [None] * len(texts)
    errors: list[str | None] = [None] * len(texts)

    def run(idx: list[int]) -> None:
        enc = tok([texts[i] for i in idx], truncation=True, max_length=max_len, padding=True, return_tensors="pt").to(dev)
        for i, r in zip(idx, _rows(omap, model(**enc).logits), strict=True):
            rows[i] = r

    model.eval()
    in_batches(run, range(len(texts)), batch_size, errors)
    return rows, errors


def load_classifier(path: Path, device: torch.device, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from daemon.jobs.model_loader import require_safetensors

    require_safetensors(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype or "auto", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(path))
    _pad(model, tok)
    return model.to(device).eval(), tok


def _pad(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Sequence classification pools the last non-pad token, so both need a pad id (decoder tokenizers often lack one)."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.config.pad_token_id = tok.pad_token_id


def fine_tune(
    spec: RaterTrainSpec, device: torch.device, anns: list[Annotation], criteria: list[str], domains: list[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The served model as a sequence classifier (fp32 weights, AdamW), criteria as sigmoid outputs, then domain logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(spec.seed)
    k = len(criteria)
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.served, num_labels=k + max(1, len(domains)), dtype=torch.float32, use_safetensors=True
    )
    tok = AutoTokenizer.from_pretrained(spec.served)
    _pad(model, tok)
    model.config.id2label = dict(enumerate([*criteria, *(f"domain:{d}" for d in domains or ["none"])]))
    model.config.label2id = {v: i for i, v in model.config.id2label.items()}
    model.to(device).train()
    y, m, d = rating_targets(anns, criteria, domains, spec.scale)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr or 3e-4, weight_decay=0.01)
    order = list(range(len(anns)))
    gen = torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.epochs or 3):
        perm = torch.randperm(len(order), generator=gen).tolist()
        for b in range(0, len(perm), spec.batch_size):
            idx = perm[b : b + spec.batch_size]
            enc = tok([anns[i].text for i in idx], truncation=True, max_length=spec.max_len, padding=True, return_tensors="pt").to(device)
            z = model(**enc).logits.float()
            loss = rating_loss(z[:, :k], z[:, k:], y[idx].to(device), m[idx].to(device), d[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), tok


def write_classifier(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: HeadConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    (out_dir / HEAD_CONFIG).write_text(json.dumps(asdict(cfg), indent=1, sort_keys=True), encoding="utf-8")
