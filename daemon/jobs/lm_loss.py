"""Token-level loss of a causal LM over a set of documents.

Shared by drift measurement (loss of new data vs reference under the serving
model) and evaluation (held-out loss of candidate vs serving), so both score
text exactly the same way: each document is tokenised on its own, prefixed by
BOS, cut into windows of at most `max_len` tokens, and every predicted token
counts once. The mean is over tokens, not documents, so long documents weigh
what they contain.

token_nll is the one next-token cross-entropy of the project (training,
held-out loss, benchmark log-likelihoods): the output projection runs over
chunks of tokens and each chunk's logits are upcast to fp32 on their own, so
the whole batch's vocabulary-wide fp32 logits (8 x 2048 x 128k = 8 GiB) never
exist; backward recomputes each chunk's logits rather than keeping them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from daemon.jobs.model_loader import CausalLM

IGNORE = -100  # a target that is not predicted (torch's cross-entropy default)
LOGIT_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk: 523 tokens of a 128k vocabulary
# Configs whose forward transforms the projection's output (softcapping, scaling): their loss is taken from the
# whole logits, each chunk upcast on its own.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_TARGETS = "_cptd_next_tokens"  # set on the output projection for the length of one token_nll forward


@dataclass(frozen=True)
class LossResult:
    mean_nll: float  # nats per predicted token
    tokens: int
    per_doc: list[float]  # mean nats per token of each document (nan for a document with no predicted token)


def token_nll(model: Any, next_tokens: torch.Tensor, chunk_tokens: int | None = None, **forward: Any) -> torch.Tensor:
    """`model(**forward)`'s fp32 NLL of `next_tokens` ([B, L]: the token each position predicts, IGNORE where none;
    0 there in the result), never holding more than `chunk_tokens` positions' logits (default: LOGIT_CHUNK_BYTES).

    The loss is computed inside the output projection's own call, which the model makes once: under FSDP2 that call
    is what gathers the projection's weight (its own unit), and under DDP the forward goes through the wrapper. The
    projection's forward is replaced once per model by one that returns the NLL while targets are set on it, and
    the logits otherwise; `model` may be wrapped (DDP, torch.compile, peft)."""
    inner = getattr(model, "module", model)  # DDP
    get_base = getattr(inner, "get_base_model", None)  # peft
    base = get_base() if get_base is not None else inner
    head = base.get_output_embeddings()
    if head is None or any(getattr(base.config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        logits = model(**forward).logits
        return _chunked(lambda h: h, logits, next_tokens, chunk_tokens or _chunk_for(logits.shape[-1])).view(next_tokens.shape)
    if "forward" not in head.__dict__:
        head.forward = _head_forward.__get__(head)
    setattr(head, _TARGETS, (next_tokens, chunk_tokens or _chunk_for(int(head.weight.shape[0]))))
    try:
        nll = model(**forward).logits
    finally:
        setattr(head, _TARGETS, None)
    return nll.reshape(next_tokens.shape)


def _head_forward(head: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection: per-position NLL while token_nll has set targets on it, its own forward otherwise."""
    targets = getattr(head, _TARGETS, None)
    own = type(head).forward.__get__(head)
    if targets is None:
        return own(hidden)
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        next_tokens, chunk = targets
        return _linear_nll(hidden.reshape(-1, hidden.shape[-1]), head.weight, next_tokens.reshape(-1), chunk)
    return _chunked(own, hidden, *targets)  # a LoRA head, a biased one: checkpointed chunks of its own forward


def _linear_nll(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, chunk: int) -> torch.Tensor:
    return cast("torch.Tensor", LinearNLL.apply(h, weight, t, chunk))


class LinearNLL(torch.autograd.Function):
    """NLL of `h @ weight.T` against targets, one chunk of rows at a time, forward and backward; the weight's
    gradient is summed in place in one buffer. (Checkpointed chunks under autograd would sum it out of place: three
    weight-sized tensors at once, a whole bf16 head more than the unchunked loss, 1 GiB for Llama-3-8B.)"""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, chunk: int) -> torch.Tensor:
        dev = h.device.type
        ctx.amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        ctx.chunk = chunk
        ctx.save_for_backward(h, weight, t)
        parts = [
            F.cross_entropy((h[i : i + chunk] @ weight.T).float(), t[i : i + chunk], ignore_index=IGNORE, reduction="none")
            for i in range(0, h.shape[0], chunk)
        ]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        h, weight, t = ctx.saved_tensors
        chunk, dev = ctx.chunk, h.device.type
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        with torch.autocast(dev, dtype=ctx.amp or torch.float32, enabled=ctx.amp is not None):
            for i in range(0, h.shape[0], chunk):
                hc, tc = h[i : i + chunk], t[i : i + chunk]
                logits = (hc @ weight.T).float()
                p = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_()  # softmax, in place
                valid = (tc != IGNORE).to(p.dtype)
                p.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), -valid.unsqueeze(1))  # minus the target's one-hot
                g = p.mul_((grad[i : i + chunk] * valid).unsqueeze(1)).to(ctx.amp or h.dtype)
                if grad_h is not None:
                    grad_h[i : i + chunk] = g @ weight
                if grad_w is not None:
                    if ctx.amp is None:
                        grad_w.addmm_(g.T, hc)
                    else:
                        grad_w += g.T @ hc
        return grad_h, grad_w, None, None


def _chunk_for(vocab: int) -> int:
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab))


def _chunked(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, next_tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """NLL per position, `chunk` positions at a time; checkpointed under autograd, so backward recomputes each
    chunk's logits rather than keeping them all."""
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])
    t = next_tokens.reshape(-1)
    parts = []
    for i in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_nll, project, h[i : i + chunk], t[i : i + chunk], use_reentrant=False))
        else:
            parts.append(_nll(project, h[i : i + chunk], t[i : i + chunk]))
    return torch.cat(parts)  # flat, not a view: FSDP2 hooks the projection's output for backward


def _nll(project: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(project(h).float(), t, ignore_index=IGNORE, reduction="none")


def window_nll(model: CausalLM, inp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL of each predicted token of a padded batch of windows ([B, W-1], 0 at padding): the step that holds the
    memory, shared with the memory plan (daemon/jobs/memory_plan.py), which runs it on fake tensors."""
    nxt = inp[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return token_nll(model, nxt, input_ids=inp[:, :-1], attention_mask=mask[:, :-1])


def mean_token_loss(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int = 512, batch_size: int = 8
) -> LossResult:
    """Mean next-token NLL over all documents; one forward per window, batched with padding masked out."""
    import math

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
