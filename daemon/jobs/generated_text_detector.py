"""Is a document likely machine-generated? A Binoculars score (Hans et al., 2024) with the served model and the original base.

Why this form: a text's perplexity alone does not say who wrote it; a short,
plain human sentence can be as predictable as a generation. Binoculars divides
the perplexity by how surprising the text *should* be to a model: the
cross-entropy between two models' next-token distributions at the same
positions. Text a model sampled has a log-perplexity at or below that
expectation (score near or below 1); human text is more surprising than the
models expect (score above 1). Here the performer is the served model (the
generator whose output comes back) and the observer is the original base
(CPTD_BASE_CHECKPOINT), so

    score = NLL_served(x) / H(served -> base)(x),   H = mean over positions of -sum_v p_served(v) log p_base(v)

With served == base (before the first deployed round) H is the model's own
entropy and the score is still meaningful. The threshold below which a
document is suspected is calibrated per deployment from held-out human and
generated samples (`cptd calibrate-detector`, policies/collapse.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from daemon.jobs.model_loader import load_causal_lm, load_tokenizer, resolve_device
from daemon.jobs.specs import DetectorSpec, write_result

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from daemon.jobs.model_loader import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def token_windows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Each document tokenised on its own with BOS, cut to its first `max_len` tokens (the score needs no more)."""
    bos = tokenizer.bos_token_id
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][: max_len - (bos is not None)]
        out.append(([bos] if bos is not None else []) + ids)
    return out


def binoculars(
    served: CausalLM, observer: CausalLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int = 512, batch_size: int = 8
) -> list[dict]:
    """Per document: mean NLL under `served`, cross-entropy served -> observer, their ratio, predicted tokens."""
    dev = next(served.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    wins = token_windows(tokenizer, texts, max_len)
    out: list[dict] = []
    with torch.no_grad():
        for b in range(0, len(wins), batch_size):
            chunk = wins[b : b + batch_size]
            width = max(len(w) for w in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, w in enumerate(chunk):
                inp[i, : len(w)] = torch.tensor(w)
                mask[i, : len(w)] = 1
            inp, mask = inp.to(dev), mask.to(dev)
            lp_s = torch.log_softmax(served(input_ids=inp, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            lp_o = torch.log_softmax(observer(input_ids=inp, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            tgt, m = inp[:, 1:], mask[:, 1:].float()
            nll = -lp_s.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            xent = -(lp_s.exp() * lp_o).sum(-1)
            n = m.sum(1)
            for i in range(len(chunk)):
                k = int(n[i])
                if k == 0:
                    out.append({"nll": None, "xent": None, "score": None, "tokens": 0})
                    continue
                a, x = float((nll[i] * m[i]).sum() / k), float((xent[i] * m[i]).sum() / k)
                out.append({"nll": round(a, 5), "xent": round(x, 5), "score": round(a / x, 5) if x > 0 else None, "tokens": k})
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.generated_text_detector SPEC.json")
    spec = DetectorSpec.read(argv[0])
    device = resolve_device(spec.device)
    dtype = DTYPES[spec.dtype] if spec.dtype else None
    t0 = time.monotonic()
    rows = [json.loads(line) for line in Path(spec.docs_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    served = load_causal_lm(spec.served, device=device, dtype=dtype, adapter=spec.adapter)
    observer = served if spec.reference == spec.served and not spec.adapter else load_causal_lm(spec.reference, device=device, dtype=dtype)
    scores = binoculars(served, observer, load_tokenizer(spec.served), [r["text"] for r in rows], spec.max_len, spec.batch_size)
    write_result(
        spec.result_file,
        {
            "rows": [{"key": r.get("key"), **s} for r, s in zip(rows, scores, strict=True)],
            "docs": len(rows),
            "device": str(device),
            "seconds": round(time.monotonic() - t0, 3),
        },
    )


if __name__ == "__main__":
    main()
