"""Measure drift of new documents against the reference (replay) set under the serving model.

`python -m daemon.jobs.drift_probe SPEC.json` (a DriftSpec) writes the statistics
as its result file (spec.out); the daemon calls `measure_drift` at SNAPSHOT
and hands the result to policies.drift.adjust_for_drift. Both sets are scored by the
shared token-loss function, the same one evaluation uses, so "loss" means the
same thing in the drift record and the eval record.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from daemon.jobs.lm_loss import mean_token_loss
from daemon.jobs.model_loader import DTYPES, load_causal_lm, load_tokenizer, resolve_device
from daemon.jobs.specs import DriftSpec, read_texts, write_result
from policies.drift import DriftStats, measured_stats, probe_sample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from daemon.jobs.model_loader import CausalLM


def unigram_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> Counter:
    counts: Counter = Counter()
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    return counts


def drift_stats(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, new: Sequence[str], ref: Sequence[str], max_len: int = 512
) -> DriftStats:
    ln = mean_token_loss(model, tokenizer, new, max_len=max_len)
    lr = mean_token_loss(model, tokenizer, ref, max_len=max_len)
    counts = unigram_counts(tokenizer, new), unigram_counts(tokenizer, ref)
    return measured_stats((ln.mean_nll, lr.mean_nll), (ln.tokens, lr.tokens), counts, new, ref)


def measure_drift(
    model_dir: str,
    new: Sequence[str],
    ref: Sequence[str],
    max_docs: int = 256,
    max_len: int = 512,
    seed: int = 0,
    device: str = "auto",
    dtype: str | None = None,
) -> DriftStats:
    """Under the serving model as served: its dtype, on the trainer's device (daemon/jobs/model_loader.py)."""
    model, tokenizer = load_causal_lm(model_dir, device=device, dtype=DTYPES[dtype] if dtype else None), load_tokenizer(model_dir)
    return drift_stats(model, tokenizer, probe_sample(new, max_docs, seed), probe_sample(ref, max_docs, seed + 1), max_len)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.drift_probe SPEC.json")
    spec = DriftSpec.read(argv[0])
    device = str(resolve_device(spec.device))
    t0 = time.monotonic()
    new, ref = read_texts(spec.new_path), read_texts(spec.ref_path)
    s = measure_drift(spec.model, new, ref, spec.max_docs, spec.max_len, spec.seed, device, spec.dtype)
    write_result(spec.result_file, {**asdict(s), **s.derived(), "device": device, "seconds": round(time.monotonic() - t0, 3)})


if __name__ == "__main__":
    main()
