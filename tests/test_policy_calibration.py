"""Regression guard for the drift calibration of bench/replay_lr_grid.py (docs/round-engine.md, Drift > Calibration).

The bench's two shifts on a small version of its data: D0 = English prose from Python's docs, D1-weak =
English paragraphs of the Debian handbook, D1-strong = its German edition. Under a byte-level BPE trained on
D0 only (what a served English tokenizer is) and an untrained tiny Llama (its losses are flat, so the
perplexity gap says nothing and the model-free statistics decide: unigram JS distance and fertility),
the default DriftPolicy/ReplayPolicy must replay more for the strong shift than for the weak one.
No training, a few seconds on CPU.
"""

from __future__ import annotations

import random

import pytest

from daemon.dev.multilingual_corpus import HandbookMissing, paragraphs
from daemon.dev.sample_corpus import english_docs
from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama
from daemon.jobs.drift_probe import drift_stats
from daemon.jobs.model_loader import load_causal_lm, load_tokenizer
from policies.drift import DriftPolicy, adjust_for_drift
from policies.replay import ReplayPolicy


def handbook_docs(lang: str, n: int) -> list[str]:
    try:
        pages = list(paragraphs(lang))
    except HandbookMissing as e:  # never a skip: the calibration must be guarded everywhere the suite runs
        pytest.fail(f"the Debian package debian-handbook is needed (make install-test, or apt-get install -y debian-handbook): {e}")
    random.Random(0).shuffle(pages)
    docs = ["\n\n".join(pars[:4]) for pars in pages if len(pars) >= 2]
    return docs[:n]


def test_strong_shift_gets_more_replay_than_weak(tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    d0 = english_docs(48, target_bytes=1500, seed=0)
    weak, strong = handbook_docs("en", 32), handbook_docs("de", 32)
    assert len(weak) == 32 and len(strong) == 32
    model_dir = build_tiny_llama(
        tmp_path / "m",
        d0[:32],
        TinyLlamaShape(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1
        ),
    )
    model, tok = load_causal_lm(str(model_dir), device="cpu"), load_tokenizer(str(model_dir))
    ref = d0[32:]
    policy, replay = DriftPolicy(), ReplayPolicy()
    s_weak = drift_stats(model, tok, weak, ref, max_len=128)
    s_strong = drift_stats(model, tok, strong, ref, max_len=128)
    d_weak, d_strong = adjust_for_drift(s_weak, policy, replay), adjust_for_drift(s_strong, policy, replay)
    msg = f"weak {d_weak.to_record()}\nstrong {d_strong.to_record()}"
    assert s_strong.js_distance > s_weak.js_distance, msg
    assert s_strong.fertility_ratio > s_weak.fertility_ratio, msg
    assert d_strong.level == "strong", msg
    assert d_strong.replay_ratio > d_weak.replay_ratio, msg
    assert d_strong.peak_lr >= d_weak.peak_lr, msg
