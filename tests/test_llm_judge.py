"""The `llm_judge` rater against a real vLLM CPU server, through SNAPSHOT with a real Redis buffer.

The judge is the tiny test Llama (tests/vllm_fixtures.py, the server without LoRA the scoring tests share). It knows
nothing about quality, so these tests check the plumbing, not the judgement: with guided decoding its answers follow
the schema and every document is rated; without it the model writes token salad (`invalid_output`). A judge that
takes connections and never answers (a hung server: a listening socket, `silent_judge`) times every request out, and
the rest are given up. (A timeout shorter than vLLM's answers is not a slow judge under load: a thread descheduled
past the answer reads it at once, and the request succeeds.) Each time the round goes on, takes
documents, and its record counts the rated and the unrated by reason.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from connectors.redis_store import BatchItem, RedisStore
from daemon import metrics as M
from daemon.round_record import RoundRecord, RoundState
from daemon.rounds.context import RoundContext
from daemon.rounds.doc_rating import from_rows, judge_pool
from daemon.rounds.snapshot import snapshot
from daemon.serving import ServingController, ServingState
from daemon.settings import Settings
from policies.config import Policy
from policies.dedup import content_key
from policies.rating import UNRATED_ABANDONED, UNRATED_INVALID, UNRATED_RANGE, UNRATED_ROW, UNRATED_TIMEOUT, RaterPolicy
from tests.job_context import CancelFlag, bare_record, job_context
from tests.vllm_fixtures import CORPUS, SERVED_NAME

pytestmark = pytest.mark.slow  # a vLLM server

DOCS = 12
# The shared server runs max_model_len 256 and the tiny tokenizer spends ~0.7 tokens per character: a short prompt.
PROMPT = "Rate 1-{scale}: {criteria}. Domain: {domains}.\n{text}\nJSON: "
CRITERIA = ["coherence", "overall"]
DOMAINS = ["coding", "culture"]


def rater(url: str, **kw) -> dict:
    return {
        "backend": "llm_judge",
        "url": url,
        "model": SERVED_NAME,
        "criteria": CRITERIA,
        "domains": DOMAINS,
        "prompt": PROMPT,
        "max_doc_chars": 120,
        "max_tokens": 150,  # the pattern fixes all but digits and the domain: ~40 tokens for two criteria
        "concurrency": 2,
        **kw,
    }


@pytest.fixture
def silent_judge() -> Iterator[str]:
    """A server that accepts connections and never answers: the judge that hangs."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)  # the kernel completes the handshakes; nobody reads or writes
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"


def buffer(store: RedisStore) -> list[str]:
    texts = [f"{CORPUS[i * 7 % len(CORPUS)]} part {i}".ljust(100, ".") for i in range(DOCS)]  # one size: budget in whole docs
    items = [
        BatchItem("docs", 0, i, "candidate", "", content_key(t), len(t.encode()), (), {"text": t, "bytes": len(t.encode())}, "human")
        for i, t in enumerate(texts)
    ]
    store.write_batch(items, max_exact_keys=10_000)
    return [content_key(t) for t in texts]


def run_snapshot(redis_client: redis_lib.Redis, tmp_path: Path, curation: dict) -> tuple[RoundRecord, list[dict], list[str]]:
    """SNAPSHOT of one round over a fresh buffer of DOCS documents; the pool is all of them, the budget about half."""
    store = RedisStore(redis_client, tmp_path.name)
    keys = buffer(store)
    policy = Policy.model_validate(
        {"curation": {"pool_factor": 3, **curation}, "rounds": {"budget_tokens": DOCS * 100 // 8, "heldout_frac": 0}}
    )
    ctx = RoundContext(store, Settings(checkpoint_dir=tmp_path), get_policy=lambda: policy, owner="t", fence=store.lease_acquire("t", 60))
    rec = bare_record("r00001", RoundState.SNAPSHOT)
    rec.policy = policy
    snapshot(ctx, rec)
    assert rec.state == RoundState.TRAINING and rec.snapshot is not None
    manifest = [json.loads(x) for x in Path(rec.snapshot.manifest).read_text().splitlines()]
    return rec, manifest, keys


def rated_metric(outcome: str) -> float:
    return M.REGISTRY.get_sample_value("cptd_rater_docs_total", {"backend": "llm_judge", "outcome": outcome}) or 0.0


def test_guided_answers_rate_every_document_and_top_k_selects_by_them(redis_client, tmp_path, vllm_plain_server):
    before = rated_metric("rated")
    rec, manifest, keys = run_snapshot(redis_client, tmp_path, {"select": "top_k", "rater": rater(vllm_plain_server.url)})
    r = rec.curation.rater if rec.curation else None
    assert r is not None and r.backend == "llm_judge" and r.error is None
    assert r.rated_docs == DOCS and r.unrated == {}, r
    assert r.seconds and r.docs_per_s and r.docs_per_s > 0
    print(f"\njudge: {DOCS} documents rated in {r.seconds} s ({r.docs_per_s} docs/s, concurrency 2)")
    assert rated_metric("rated") - before == DOCS
    decision = json.loads((tmp_path / "rounds" / "r00001" / "data" / "curation.json").read_text())
    scores = decision["scores"]
    assert set(scores) == set(keys)
    for s in scores.values():
        assert set(s["criteria"]) == set(CRITERIA) and all(1 <= v <= 5 for v in s["criteria"].values())
        assert s["overall"] == s["criteria"]["overall"] and s["rater_domain"] in DOMAINS
    assert manifest and all({"overall", "criteria", "rater_domain"} <= set(m) for m in manifest)
    chosen = [scores[m["key"]]["overall"] for m in manifest]
    waiting = [scores[k]["overall"] for k in decision["selection"]["waiting"]]
    assert waiting and min(chosen) >= max(waiting)  # top_k: nothing that waited was rated above what was taken
    assert r.chosen is not None and r.waiting is not None
    assert r.chosen.docs == len(manifest) and r.waiting.docs == len(waiting)
    assert r.chosen.criteria["overall"].mean == pytest.approx(sum(chosen) / len(chosen), abs=1e-3)
    assert sum(r.chosen.domains.values()) == len(manifest) and set(r.chosen.domains) <= set(DOMAINS)


def test_a_judge_writing_garbage_leaves_the_round_unrated_and_going(redis_client, tmp_path, vllm_plain_server):
    """guided: false: the tiny model writes token salad; on_error: unrated lets the documents join all the same."""
    before = rated_metric(UNRATED_INVALID)
    rec, manifest, keys = run_snapshot(
        redis_client, tmp_path, {"select": "top_k", "rater": rater(vllm_plain_server.url, guided=False, on_error="unrated")}
    )
    r = rec.curation.rater if rec.curation else None
    assert r is not None and r.rated_docs == 0 and r.unrated == {UNRATED_INVALID: DOCS}
    assert rated_metric(UNRATED_INVALID) - before == DOCS
    assert manifest and [m["key"] for m in manifest] == keys[: len(manifest)]  # unrated: oldest first
    assert all(m.get("unrated") == UNRATED_INVALID and "overall" not in m for m in manifest)
    assert rec.curation is not None and rec.curation.waiting == {"budget": DOCS - len(manifest)}


def test_a_judge_too_slow_times_out_and_the_documents_wait(redis_client, tmp_path, silent_judge):
    """A judge that never answers within timeout_s: the first requests time out, the rest are given up; on_error: wait keeps every
    document in the buffer (no pass counted), and the round, with nothing to take, fails SNAPSHOT without dropping any."""
    from daemon.rounds.context import RoundFailed

    with pytest.raises(RoundFailed, match="unrated"):
        run_snapshot(redis_client, tmp_path, {"select": "top_k", "rater": rater(silent_judge, timeout_s=0.2, on_error="wait")})
    decision_file = tmp_path / "rounds" / "r00001" / "data" / "curation.json"
    assert not decision_file.exists()  # nothing decided, nothing moved
    store = RedisStore(redis_client, tmp_path.name)
    assert redis_client.zcard(store.k_buffer) == DOCS and redis_client.hlen(store.k_passes) == 0


def test_a_slow_judge_under_on_error_unrated_records_timeouts_and_abandoned(tmp_path, silent_judge):
    policy = RaterPolicy(**rater(silent_judge, timeout_s=0.2))
    ctx = job_context(Settings(checkpoint_dir=tmp_path), CancelFlag())
    out = judge_pool(ctx, policy, "r00001", [_doc(i) for i in range(DOCS)])
    reasons = list(out.unrated.values())
    assert not out.ratings and len(reasons) == DOCS and set(reasons) <= {UNRATED_TIMEOUT, UNRATED_ABANDONED}
    assert reasons.count(UNRATED_TIMEOUT) >= 2 * policy.concurrency and UNRATED_ABANDONED in reasons  # gave up, did not wait out all
    assert out.error and "timeout" in out.error


def test_the_served_replicas_are_not_asked_unless_allowed(tmp_path, vllm_plain_server):
    state = ServingState(desired_version="base")
    ctx = job_context(Settings(checkpoint_dir=tmp_path), CancelFlag(), serving=ServingController([vllm_plain_server.url + "/"], state))
    try:
        refused = judge_pool(ctx, RaterPolicy(**rater(vllm_plain_server.url + "/v1")), "r00001", [_doc(0)])
        assert refused.ratings == {} and refused.unrated == {"d0": "skipped"} and "served replica" in (refused.error or "")
        allowed = judge_pool(ctx, RaterPolicy(**rater(vllm_plain_server.url, allow_served_replicas=True)), "r00001", [_doc(0)])
        assert set(allowed.ratings) == {"d0"}, (allowed.unrated, allowed.error)
    finally:
        ctx.serving.close()  # type: ignore[union-attr]


def test_job_rows_are_checked_like_answers():
    """A rating job's result, in part bad: each row is rated or unrated with its reason; missing keys are not invented."""
    policy = RaterPolicy(backend="head", criteria=CRITERIA, domains=DOMAINS)
    rows = [
        {"key": "a", "overall": 4.5, "criteria": {"coherence": 3.2, "overall": 4.5}, "domain": "coding"},
        {"key": "b", "overall": 7, "criteria": {"coherence": 3, "overall": 7}, "domain": "coding"},
        {"key": "c", "error": "too long"},
        {"key": "d", "overall": 2, "criteria": {"overall": 2}},
        {"overall": 3},
    ]
    out = from_rows("head", rows, policy, 2.0)
    assert set(out.ratings) == {"a"} and out.ratings["a"].criteria["coherence"] == 3.2
    assert out.unrated == {"b": UNRATED_RANGE, "c": UNRATED_ROW, "d": UNRATED_INVALID}
    assert out.record().docs_per_s == 0.5


def _doc(i: int):
    from connectors.redis_store import StoredDoc

    t = CORPUS[i]
    return StoredDoc(key=f"d{i}", text=t, bytes=len(t))


def test_a_failed_rating_job_leaves_the_round_going_unrated(redis_client, tmp_path):
    """backend: classifier with a model directory that is not there: the rating job on the trainer's device fails, the
    round takes its documents oldest first (on_error: unrated) and says why none was rated."""
    before = M.REGISTRY.get_sample_value("cptd_rater_docs_total", {"backend": "classifier", "outcome": "job_failed"}) or 0.0
    rec, manifest, keys = run_snapshot(
        redis_client, tmp_path, {"select": "sample", "rater": {"backend": "classifier", "path": str(tmp_path / "no-such-model")}}
    )
    r = rec.curation.rater if rec.curation else None
    assert r is not None and r.backend == "classifier" and r.rated_docs == 0 and r.unrated == {"job_failed": DOCS} and r.error
    assert [m["key"] for m in manifest] == keys[: len(manifest)] and len(manifest) == DOCS // 2
    assert (tmp_path / "rounds" / "r00001" / "rater-spec.json").exists()
    after = M.REGISTRY.get_sample_value("cptd_rater_docs_total", {"backend": "classifier", "outcome": "job_failed"})
    assert after == before + DOCS
