"""Document scoring (`Replica.prompt_logprobs`) against a real vLLM CPU server, checked against transformers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from connectors.vllm import DocScore, Replica, ServingError
from daemon.dev.sample_corpus import english_docs
from tests.vllm_fixtures import CORPUS, TinyModels

pytestmark = pytest.mark.slow  # a vLLM server and the tiny models

TOL = 1e-2  # nats per token; both sides compute in bf16 on the CPU (measured differences <= 2e-3)
NON_ASCII = [
    "Tiếng Việt là ngôn ngữ chính thức của Việt Nam. Người ta viết nó bằng chữ Quốc ngữ, dựa trên bảng chữ cái Latinh.",
    "中文是世界上使用人数最多的语言之一。汉字已有几千年的历史，今天仍在日常生活中广泛使用。",
]


def _hf_scores(model_dir: Path, texts: list[str], max_tokens: int | None = None) -> list[DocScore]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto").eval()
    out = []
    for t in texts:
        ids = torch.tensor([tok(t).input_ids[:max_tokens]])
        with torch.inference_mode():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        out.append(DocScore(float(lp.gather(1, ids[0, 1:, None]).sum()), ids.shape[1] - 1))
    return out


@pytest.fixture
def replica(vllm_plain_server):
    """The server started without --enable-lora: on vLLM 0.32 (CPU) a prompt-logprobs request to a LoRA-enabled
    server kills its engine (LoRA logits einsum shape mismatch, vllm-project/vllm#29955), adapter or not."""
    r = Replica(vllm_plain_server.url)
    yield r
    r.close()


@pytest.fixture
def served_dir(tiny_models: TinyModels) -> Path:
    return tiny_models.root / "base-bf16"  # what vllm_plain_server serves (bf16, computed in bf16 on both sides)


def _assert_close(got: list[DocScore], want: list[DocScore]) -> None:
    assert [g.tokens for g in got] == [w.tokens for w in want]
    for g, w in zip(got, want, strict=True):
        assert abs(g.nll - w.nll) < TOL, (g, w)


def test_agrees_with_transformers(replica: Replica, served_dir: Path):
    # the tiny tokenizer knows only the toy corpus: ~0.8 tokens per character of prose; keep under the 256 tokens
    docs = CORPUS[:5] + [d[:250] for d in english_docs(3, 600, seed=2)]
    got = replica.prompt_logprobs(docs)
    _assert_close(got, _hf_scores(served_dir, docs))
    assert all(g.tokens > 5 and math.isclose(g.ppl, math.exp(g.nll)) for g in got)


def test_over_long_document_is_truncated(replica: Replica, served_dir: Path):
    long_doc = english_docs(1, 8000, seed=3)[0]  # ~2,300 tokens; the server takes 256
    limit = replica.max_model_len()
    assert limit == 256
    (whole,) = replica.prompt_logprobs([long_doc])
    assert whole.tokens == limit - 2  # first `limit - 1` tokens kept (one position for the generated token), first unscored
    (cut,) = replica.prompt_logprobs([long_doc], max_tokens_per_doc=50)
    assert cut.tokens == 49
    _assert_close([whole, cut], _hf_scores(served_dir, [long_doc], limit - 1) + _hf_scores(served_dir, [long_doc], 50))
    with pytest.raises(ValueError):
        replica.prompt_logprobs([long_doc], max_tokens_per_doc=1)


def test_many_documents_in_order(replica: Replica, served_dir: Path):
    docs = [CORPUS[i % len(CORPUS)] + f" number {i}." for i in range(75)]
    docs[40] = ""  # an empty document is not sent and scores nothing
    got = replica.prompt_logprobs(docs, batch_size=32)  # three requests
    assert len(got) == 75 and got[40] == DocScore(0.0, 0) and math.isnan(got[40].nll)
    rest = [i for i in range(75) if i != 40]
    _assert_close([got[i] for i in rest], _hf_scores(served_dir, [docs[i] for i in rest]))
    # one document per request gives the same answers
    assert [replica.prompt_logprobs([docs[i]])[0].tokens for i in (0, 74)] == [got[0].tokens, got[74].tokens]


def test_non_ascii_documents(replica: Replica, served_dir: Path):
    got = replica.prompt_logprobs(NON_ASCII)
    assert all(g.tokens > 20 for g in got)  # byte-level BPE: many tokens each
    _assert_close(got, _hf_scores(served_dir, NON_ASCII))


def test_errors_name_the_replica_and_the_documents(replica: Replica):
    with pytest.raises(ServingError) as e:
        replica.prompt_logprobs(["one", "two", "three"], model="no-such-model")
    assert replica.url in str(e.value) and "docs 1-3 of 3" in str(e.value)


def test_drift_of_the_served_model_is_measured_through_vllm_with_no_model_loaded(replica: Replica, served_dir: Path, tmp_path: Path):
    """SNAPSHOT's drift probe under the parent that serves now: losses from prompt logprobs (each document's first
    `probe_max_len` tokens), token histograms from /tokenize; agrees with transformers on the served checkpoint, and
    no drift probe job is started. A version no replica serves is left to the job on the trainer's device."""
    from collections import Counter

    from transformers import AutoTokenizer

    from daemon.round_record import Parent, RoundState
    from daemon.rounds.context import write_texts
    from daemon.rounds.drift_measure import measure_for_round, serving_replica
    from daemon.serving import ReplicaState, ServingController, ServingState
    from daemon.settings import Settings
    from policies.config import Policy
    from policies.drift import js_distance
    from tests.job_context import CancelFlag, bare_record, job_context

    new, ref = CORPUS[:4], [d[:250] for d in english_docs(4, 600, seed=5)]
    state = ServingState(desired_version="base", replicas={replica.url: ReplicaState(url=replica.url, version="base", status="serving")})
    ctx = job_context(Settings(checkpoint_dir=tmp_path), CancelFlag(), serving=ServingController([replica.url], state))
    rec = bare_record("r00002", RoundState.SNAPSHOT)
    rec.policy = Policy.model_validate({"drift": {"probe_docs": 8, "probe_max_len": 64}})
    rec.parent = Parent(version="base", checkpoint=str(served_dir))
    write_texts(tmp_path / "new.jsonl", new)
    write_texts(tmp_path / "ref.jsonl", ref)
    s = measure_for_round(ctx, rec, tmp_path / "new.jsonl", tmp_path / "ref.jsonl")
    assert s is not None and not (ctx.round_dir(rec.id) / "drift-spec.json").exists(), "measured through vLLM, no job"
    for loss, tokens, texts in ((s.loss_new, s.tokens_new, new), (s.loss_ref, s.tokens_ref, ref)):
        want = _hf_scores(served_dir, texts, 64)
        assert tokens == sum(w.tokens for w in want)
        assert abs(loss + math.fsum(w.logprob_sum for w in want) / tokens) < TOL
    tok = AutoTokenizer.from_pretrained(str(served_dir))
    cn, cr = (Counter(i for t in texts for i in tok(t, add_special_tokens=False).input_ids) for texts in (new, ref))
    assert (s.text_tokens_new, s.text_tokens_ref) == (sum(cn.values()), sum(cr.values()))
    assert s.js_distance == pytest.approx(js_distance(cn, cr)) and s.chars_new == sum(map(len, new))
    assert serving_replica(ctx, "r00001") is None, "not served: the job measures it"
    ctx.serving.close()
