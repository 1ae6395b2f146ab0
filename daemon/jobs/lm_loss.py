"""Token-level loss of a causal LM over a set of documents.

Shared by drift measurement (loss of new data vs reference under the serving
model) and evaluation (held-out loss of candidate vs serving), so both score
text exactly the same way: each document is tokenised on its own, prefixed by
BOS, cut into windows of at most `max_len` tokens, and every predicted token
counts once. The mean is over tokens, not documents, so long documents weigh
what they contain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from daemon.jobs.model_loader import CausalLM


@dataclass(frozen=True)
class LossResult:
    mean_nll: float  # nats per predicted token
    tokens: int
    per_doc: list[float]  # mean nats per token of each document (nan for a document with no predicted token)


def window_nll(model: CausalLM, inp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL of each predicted token of a padded batch of windows ([B, W-1], 0 at padding): the step that holds the
    memory, shared with the memory plan (daemon/jobs/memory_plan.py), which runs it on fake tensors."""
    import torch

    logits = model(input_ids=inp, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -logp.gather(-1, inp[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]


def mean_token_loss(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int = 512, batch_size: int = 8
) -> LossResult:
    """Mean next-token NLL over all documents; one forward per window, batched with padding masked out."""
    import math

    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos = tokenizer.bos_token_id
    windows: list[tuple[int, list[int]]] = []  # (doc index, token ids)
    for d, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos is not None:
            ids = [bos] + ids
        # Overlap one token so every token after the first is predicted exactly once.
        step = max_len - 1
        for start in range(0, max(len(ids) - 1, 1), step):
            w = ids[start : start + max_len]
            if len(w) >= 2:
                windows.append((d, w))
    doc_nll = [0.0] * len(texts)
    doc_tok = [0] * len(texts)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            width = max(len(w) for _, w in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (_, w) in enumerate(chunk):
                inp[i, : len(w)] = torch.tensor(w)
                mask[i, : len(w)] = 1
            nll = window_nll(model, inp.to(device), mask.to(device))
            for i, (d, _) in enumerate(chunk):
                doc_nll[d] += float(nll[i].sum())
                doc_tok[d] += int(mask[i, 1:].sum())
    if was_training:
        model.train()
    total = sum(doc_tok)
    per_doc = [n / t if t else math.nan for n, t in zip(doc_nll, doc_tok, strict=False)]
    return LossResult(mean_nll=(sum(doc_nll) / total) if total else math.nan, tokens=total, per_doc=per_doc)
