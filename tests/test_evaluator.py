"""Evaluation of serving vs candidate checkpoints on real tiny Llamas (CPU, seconds)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from daemon.dev.tiny_model import build_tiny_llama
from daemon.jobs.evaluator import (
    EvalData,
    EvalReport,
    encode_pair,
    evaluate_round,
    load_mc_suite,
    load_model,
    loglikelihoods,
    record_canaries,
    save_canaries,
    save_report,
)
from policies.gates import GatePolicy, gate_round

pytestmark = pytest.mark.slow  # trains and scores tiny models

COLORS = ["blue", "green", "red", "black", "white", "yellow"]
THINGS = ["sky", "grass", "rose", "night", "snow", "sun", "sea", "leaf"]
FACTS = [(t, COLORS[(i * 5) % len(COLORS)]) for i, t in enumerate(THINGS)]
NEW_DOCS = [f"in the new town the {t} is {c} today" for t, c in FACTS]
OLD_DOCS = [
    f"an old story about a {a} cat that sleeps {n} hours near the river"
    for a in ("grey", "fat", "tiny", "lazy")
    for n in ("two", "ten", "many")
]


def _fine_tune(src: Path, root: Path, texts: list[str], save_at: tuple[int, ...], lr: float = 3e-3) -> list[Path]:
    """A real CPT round in miniature: the candidates have actually learned the new documents.

    One run, checkpoints saved along the way, like the trainer's mid-round checkpoints."""
    import torch

    model, tok = load_model(src)
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = tok([tok.bos_token + t for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = []
    for step in range(1, max(save_at) + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step in save_at:
            d = root / f"step-{step}"
            shutil.copytree(src, d)
            model.save_pretrained(str(d), safe_serialization=True)
            out.append(d)
    return out


@pytest.fixture(scope="module")
def round_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    base = build_tiny_llama(root / "serving", NEW_DOCS * 3 + OLD_DOCS * 3, seed=0)
    early, late = _fine_tune(base, root, NEW_DOCS, save_at=(10, 60))
    suite = root / "colors.jsonl"
    suite.write_text(
        "".join(
            json.dumps({"context": f"in the new town the {t} is", "choices": COLORS, "answer": COLORS.index(c)}) + "\n" for t, c in FACTS
        )
    )
    canaries = save_canaries(
        record_canaries(base, ["an old story about", "the river", "in the new town the sky"], 6), root / "canaries.jsonl"
    )
    return {"root": root, "base": base, "early": early, "late": late, "suite": suite, "canaries": canaries}


def _data(d: dict[str, Path]) -> EvalData:
    return EvalData(new_docs=NEW_DOCS, replay_docs=OLD_DOCS, suites={"colors": str(d["suite"])}, canaries=str(d["canaries"]))


def test_round_report_measures_adaptation_suites_and_canaries(round_dir):
    same = round_dir["root"] / "same"
    if not same.exists():
        shutil.copytree(round_dir["base"], same)
    report = evaluate_round("r1", round_dir["base"], [same, round_dir["early"], round_dir["late"]], _data(round_dir))
    serving, (c_same, c_early, c_late) = report.serving, report.candidates

    # Scoring the serving weights as a candidate gives the serving numbers exactly: same data, same scorer.
    assert c_same.new.mean_nll == pytest.approx(serving.new.mean_nll, abs=1e-6)
    assert c_same.replay.mean_nll == pytest.approx(serving.replay.mean_nll, abs=1e-6)
    assert all(c.passed for c in c_same.canaries) and len(c_same.canaries) == 3
    assert c_same.suites["colors"].accuracy == serving.suites["colors"].accuracy

    # Training on the new documents lowers their held-out loss, more with more steps, and teaches the facts.
    assert serving.new.mean_nll > c_early.new.mean_nll > c_late.new.mean_nll
    assert c_late.new.perplexity == pytest.approx(math.exp(c_late.new.mean_nll))
    assert c_late.suites["colors"].accuracy == 1.0 > serving.suites["colors"].accuracy
    # ... and changes greedy behaviour somewhere: a canary catches it.
    assert not all(c.passed for c in c_late.canaries)
    failed = [c for c in c_late.canaries if not c.passed][0]
    assert failed.got != failed.expected

    # The gate sees the same numbers; with canaries waived the best net gain wins.
    s, cands = report.gate_inputs()
    strict = gate_round(GatePolicy(max_forgetting_nats=100.0, max_forgetting_relative=None), s, cands)
    assert strict.accepted and strict.chosen == "same"  # the only one whose canaries all hold
    lenient = gate_round(GatePolicy(max_forgetting_nats=100.0, max_forgetting_relative=None, canaries_must_pass=False), s, cands)
    assert lenient.chosen in ("step-10", "step-60")

    path = save_report(report, round_dir["root"] / "round-r1")
    back = EvalReport.from_json(path.read_text())
    assert back.to_json() == report.to_json()


def test_loglikelihood_follows_harness_tokenisation(round_dir):
    model, tok = load_model(round_dir["base"])
    # Trailing context space moves to the continuation, as in lm-eval-harness.
    ctx, cont = encode_pair(tok, "the sky is ", "blue")
    ctx2, cont2 = encode_pair(tok, "the sky is", " blue")
    assert (ctx, cont) == (ctx2, cont2) and len(cont) >= 1
    # The sum over the continuation equals scoring the full text minus scoring the context alone.
    import torch

    def seq_lp(ids: list[int]) -> float:
        ids = [tok.bos_token_id] + ids
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0], -1)
        return float(lp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum())

    (ll,) = loglikelihoods(model, tok, [("the sky is", " blue")])
    assert ll == pytest.approx(seq_lp(ctx + cont) - seq_lp(ctx), abs=1e-4)
    assert ll < 0


def test_bad_suite_file_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n{"context": "b", "choices": ["x"], "answer": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: answer 3 out of range"):
        load_mc_suite(p)
