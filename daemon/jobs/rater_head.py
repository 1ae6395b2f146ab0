"""The `head` rater: document features from the served model's own forward pass, and small heads that rate them.

Why these features: perplexity alone separates shuffled sentences from good
prose poorly (AUC 0.73 on the labelled buffer, bench/README.md), because every
sentence of a shuffled document is fluent on its own. The model's hidden
states carry more than the one number: pooled over the document, they say
what the text is about and how it reads. So, per document, in fp32 whatever
the served dtype:

* the mean and spread over positions of two layers' hidden states (the middle one and the last);
* per-token NLL statistics (mean, spread, 10/50/90% quantiles, share of tokens above 8 nats) and log length.

Tried and left out (bench/rater_quality.py, the demo's model): the cosine
similarity of consecutive sentences' or windows' mean states, and the gain
from long context (NLL in 32-token windows minus NLL in full context): each
alone separated shuffled documents at AUC 0.56-0.66 and added nothing to the
pooled states.

The heads are linear (or one hidden layer) over standardized features: one
regression output per criterion on 0..1 (rating 1..scale), and a domain
classifier. Small by design: they are trained from a few hundred pointwise
ratings (`cptd rater-train`) and must not overfit them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daemon.jobs.generated_text_detector import token_windows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from daemon.jobs.model_loader import CausalLM

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "rater.json"


def _padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    inp = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        inp[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return inp.to(device), mask.to(device)


def _token_nll(logits: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """NLL of each next token (fp32), [batch, width - 1]."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -lp.gather(-1, inp[:, 1:].unsqueeze(-1)).squeeze(-1)


def _nll_stats(nll: torch.Tensor) -> list[float]:
    q = torch.quantile(nll, torch.tensor([0.1, 0.5, 0.9], device=nll.device))
    return [float(nll.mean()), float(nll.std()) if len(nll) > 1 else 0.0, *map(float, q), float((nll > 8.0).float().mean())]


def _forward(model: CausalLM, seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    dev = next(model.parameters()).device
    inp, mask = _padded(seqs, pad, dev)
    out = model(input_ids=inp, attention_mask=mask, output_hidden_states=True)
    return _token_nll(out.logits, inp), out.hidden_states, inp


def document_features(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int = 512, batch_size: int = 8
) -> tuple[list[list[float] | None], list[str | None]]:
    """(features per document or None, error per document or None)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = token_windows(tokenizer, texts, max_len)
    feats: list[list[float] | None] = [None] * len(texts)
    errors: list[str | None] = [None] * len(texts)

    def run(idx: list[int]) -> None:
        nll, hidden, _ = _forward(model, [seqs[i] for i in idx], pad)
        layers = (hidden[len(hidden) // 2], hidden[-1])
        for row, i in enumerate(idx):
            n = len(seqs[i])
            tok_nll = nll[row, : n - 1]
            f: list[float] = []
            for h in layers:
                s = h[row, :n].float()
                f += s.mean(0).tolist() + s.std(0).tolist()
            f += _nll_stats(tok_nll) + [math.log(n)]
            feats[i] = f

    order = [i for i in range(len(texts)) if len(seqs[i]) >= 2]
    for i in set(range(len(texts))) - set(order):
        errors[i] = "fewer than 2 tokens"
    in_batches(run, order, batch_size, errors)
    return feats, errors


def in_batches(run: Callable[[list[int]], None], order: Sequence[int], batch_size: int, errors: list[str | None]) -> None:
    """`run` over batches of `order` without gradients; a batch that fails is run again one document at a time, and
    the error of a document that still fails goes into `errors`, so one bad document costs only its own row."""
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = list(order[b : b + batch_size])
            try:
                run(idx)
            except Exception:  # noqa: BLE001 - find the document that breaks the batch; the others still get rated
                for i in idx:
                    try:
                        run([i])
                    except Exception as e:  # noqa: BLE001
                        errors[i] = f"{type(e).__name__}: {e}"[:300]


@dataclass
class Annotation:
    """One valid line of an annotations file: a document and its pointwise ratings (1..scale) and domain."""

    line: int
    text: str
    ratings: dict[str, float]
    domain: str | None


@dataclass
class HeadConfig:
    """What the head rates and how it was made: rater.json beside head.safetensors."""

    criteria: list[str]
    domains: list[str]
    scale: int
    features: int
    hidden: int = 0  # 0: linear heads; N: one hidden layer of N units
    max_len: int = 512
    dtype: str | None = None  # the served model's compute dtype when fitted; rating uses the same unless told otherwise
    lineage: dict[str, Any] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)


class RaterHead(nn.Module):
    """Standardize, then criteria in 0..1 (sigmoid) and domain logits."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(cfg.features))
        self.register_buffer("std", torch.ones(cfg.features))
        body: nn.Module = nn.Identity()
        width = cfg.features
        if cfg.hidden:
            body, width = nn.Sequential(nn.Linear(cfg.features, cfg.hidden), nn.GELU(), nn.Dropout(0.1)), cfg.hidden
        self.body = body
        self.criteria = nn.Linear(width, len(cfg.criteria))
        self.domain = nn.Linear(width, max(1, len(cfg.domains)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        z = self.body((x - mean) / std)
        return self.criteria(z), self.domain(z)


def ratings(head: RaterHead, cfg: HeadConfig, x: torch.Tensor) -> list[dict[str, Any]]:
    """Rows of {"overall", "criteria", "domain"} on 1..scale."""
    with torch.no_grad():
        crit, dom = head(x.float())
    vals = 1 + (cfg.scale - 1) * torch.sigmoid(crit)
    out = []
    for i in range(len(x)):
        c = {name: round(float(vals[i, j]), 4) for j, name in enumerate(cfg.criteria)}
        domain = cfg.domains[int(dom[i].argmax())] if cfg.domains else None
        out.append({"overall": c["overall"], "criteria": c, "domain": domain})
    return out


def rating_targets(anns: Sequence[Annotation], criteria: list[str], domains: list[str], scale: int) -> tuple[torch.Tensor, ...]:
    y = torch.zeros(len(anns), len(criteria))
    m = torch.zeros(len(anns), len(criteria))
    d = torch.full((len(anns),), -100, dtype=torch.long)  # -100: no domain (cross_entropy's ignore_index)
    for i, a in enumerate(anns):
        for j, c in enumerate(criteria):
            if c in a.ratings:
                y[i, j], m[i, j] = (a.ratings[c] - 1) / (scale - 1), 1.0
        if a.domain is not None:
            d[i] = domains.index(a.domain)
    return y, m, d


def rating_loss(crit: torch.Tensor, dom: torch.Tensor, y: torch.Tensor, m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    bce = torch.nn.functional.binary_cross_entropy_with_logits(crit, y, reduction="none")
    loss = (bce * m).sum() / m.sum().clamp(min=1)
    if (d >= 0).any():
        loss = loss + torch.nn.functional.cross_entropy(dom, d, ignore_index=-100)
    return loss


def save_head(head: RaterHead, cfg: HeadConfig, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in head.state_dict().items()}, str(out_dir / HEAD_WEIGHTS))
    (out_dir / HEAD_CONFIG).write_text(json.dumps(asdict(cfg), indent=1, sort_keys=True), encoding="utf-8")
    return out_dir


def load_head(path: Path) -> tuple[RaterHead, HeadConfig]:
    from safetensors.torch import load_file

    cfg = HeadConfig(**json.loads((path / HEAD_CONFIG).read_text(encoding="utf-8")))
    head = RaterHead(cfg)
    head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    return head.eval(), cfg
