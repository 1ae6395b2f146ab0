"""A candidate with another vocabulary or tokenizer is refused before any replica is touched.

vLLM's reload_weights needs the served shapes and vLLM reads the tokenizer only
when it starts, so such a candidate cannot be a round of the served model
(docs/serving.md, Vocabulary changes). The replica here is an address nobody
listens on: a deploy that got past validation would fail at its first HTTP
step, so the step a deploy stops at shows whether any request was
ever attempted; the control case proves that distinction is real.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from connectors.vllm import ServingConfig
from daemon.dev.services import free_port
from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama, train_tokenizer
from daemon.serving import ServingController

TEXTS = [f"the {w} river carries {i} boats past the old mill" for i, w in enumerate(["slow", "wide", "cold", "dark"] * 40)]
OTHER = [f"un {w} fleuve porte {i} bateaux devant le moulin" for i, w in enumerate(["lent", "large", "froid", "sombre"] * 40)]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("vocab") / "served", TEXTS, TinyLlamaShape(vocab_size=300), dtype="bfloat16")


def deploy_to_nowhere(candidate: Path, served: Path):
    ctl = ServingController([f"http://127.0.0.1:{free_port()}"], config=ServingConfig(retries=0, timeout_s=2))
    try:
        return ctl.deploy(candidate, "r1", reference=served)
    finally:
        ctl.close()


def test_a_different_vocabulary_size_never_reaches_a_replica(served, tmp_path):
    bigger = build_tiny_llama(tmp_path / "bigger", TEXTS + OTHER, TinyLlamaShape(vocab_size=420), dtype="bfloat16")
    rec = deploy_to_nowhere(bigger, served)
    assert not rec.ok and rec.error["step"] == "validate" and rec.replicas == []
    text = "\n".join(rec.rejected)
    assert "config.json vocab_size" in text and "model.embed_tokens.weight: shape/dtype" in text
    assert "cannot be hot-swapped" in text


def test_a_new_tokenizer_of_the_same_size_is_refused(served, tmp_path):
    cand = tmp_path / "retokenized"
    shutil.copytree(served, cand)
    train_tokenizer(OTHER, 300, tmp_path / "other-tok")  # same vocabulary size, other merges
    shutil.copy(tmp_path / "other-tok" / "tokenizer.json", cand / "tokenizer.json")
    rec = deploy_to_nowhere(cand, served)
    assert not rec.ok and rec.error["step"] == "validate" and rec.replicas == []
    assert any("tokenizer file tokenizer.json differs" in p for p in rec.rejected)


def test_control_a_same_shape_candidate_passes_validation_and_reaches_the_replica(served, tmp_path):
    cand = tmp_path / "same"
    shutil.copytree(served, cand)
    rec = deploy_to_nowhere(cand, served)
    assert not rec.ok and rec.rejected == [] and rec.error["step"] == "weight_checker"  # past validation: its first request
