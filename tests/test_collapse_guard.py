"""The collapse guard end to end: the served model's own outputs come back on the topic and are caught.

A real vLLM server serves a small Llama that knows some English. Its completions
are published to the echo topic (what a serving stack that logs its outputs
does); then human documents, exact copies of other completions of the same
model and light paraphrases of them (8% of words replaced or dropped, adjacent
words swapped) arrive on the document topic, with documents a generator
labelled itself. The daemon must mark the echoes synthetic, flag almost no
human document, keep the round's synthetic share within the cap, meet the
domain targets, and keep synthetic documents out of the replay reservoir.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from daemon.dev.sample_corpus import english_docs, light_paraphrase
from daemon.dev.services import create_topics, wait_for
from daemon.round_record import TERMINAL
from policies.config import Policy
from policies.quality import build_filters, judge
from tests.curation_fixtures import generate_until
from tests.streams import distinct, echoes, good_docs, produce, stored_text

pytestmark = pytest.mark.slow

TARGETS = {"news": 0.5, "docs": 0.3}  # the rest ("*"): forum and unlabelled
CAP = 0.10  # the low end of the usual 10-20%: synthetic documents are ~1/3 of the buffer, so it binds


def test_echoes_are_caught_capped_and_kept_out_of_replay(topics, bootstrap, english_vllm, english_deployment):
    completions_topic = topics["docs"] + "-completions"
    create_topics(bootstrap, {completions_topic: 1})
    dep = english_deployment(
        collapse={"echo_topics": [completions_topic], "echo_action": "mark_synthetic", "synthetic_cap": CAP},
        curation={"domain_targets": TARGETS, "pool_factor": 3},
        rounds={"budget_tokens": 50_000},  # 200 KB of new text a round, from a buffer of ~550 KB
        train={"seq_len": 128},
    )
    policy = Policy.model_validate(dep.policy.model_dump())
    filters = build_filters(policy.quality)
    rng = random.Random(3)

    # What vLLM samples differs from machine to machine, so no document's fate is assumed: each one is derived from
    # the texts with ingest's own functions. A message sharing a dedup key (content key or LSH band, of the stored
    # text) with another message or with the replay reservoir the deployment was seeded with would be kept or dropped
    # depending on arrival order, so only mutually distinct messages are sent (tests.streams.distinct): every message
    # sent is accepted. Whether a message echoes an indexed completion is computed with the echo index's parameters
    # (tests.streams.echoes), and the daemon must agree with that for every message.
    replay = [r.text for r in dep.store.get_docs(dep.store.replay_keys())]
    human = distinct(good_docs(140, policy, seed=5), replay, policy)[:120]
    assert len(human) == 120, f"only {len(human)} human documents distinct from the replay seed"
    stored = replay + [stored_text(h, filters) for h in human]
    # The served model writes: 180 completions of prompts cut from English prose that pass the heuristic filters
    # (those that do not never reach a round anyway). Prompts are sampled in order, 64 at a time, only until 180 are
    # usable (about 320 of the 464 here): the completions of one pass over them all, cut short.
    prompts = list(dict.fromkeys(" ".join(d.split()[:12]) for d in english_docs(500, 1024, seed=77)))

    def usable(texts: list[str]) -> list[str]:
        return [g for g in texts if len(g.split()) >= 50 and judge(g, filters).accepted]

    sampled = generate_until(english_vllm.url, prompts, lambda c: len(distinct(usable(c), stored, policy)) >= 180, seed=5)
    out = usable(sampled)
    gens = distinct(out, stored, policy)
    print(f"\n{len(gens)} usable completions of {len(out)} passing the filters, from {len(sampled)}/{len(prompts)} prompts")
    assert len(gens) >= 180, f"only {len(gens)} usable completions of {len(out)}"
    echoed, labelled = gens[:120], gens[120:180]
    vocab = [w for d in human[:30] for w in d.split()]
    copy_texts = echoed[:60]  # distinct from each other, the humans and the replay seed by construction of gens
    para_texts = [p for p in (light_paraphrase(g, rng, vocab) for g in echoed[60:]) if judge(p, filters).accepted]
    para_texts = distinct(para_texts, stored + [stored_text(g, filters) for g in copy_texts + labelled], policy)
    assert len(para_texts) >= 40, f"only {len(para_texts)} usable paraphrases of {len(echoed[60:])} completions"
    copies = [{"text": g, "id": f"copy-{i}"} for i, g in enumerate(copy_texts)]
    near = [{"text": p, "id": f"para-{i}"} for i, p in enumerate(para_texts)]
    domains = ["news", "news", "docs", "docs", "forum"]
    people = [{"text": t, "id": f"human-{i}", "source": "newsroom", "meta": {"domain": domains[i % 5]}} for i, t in enumerate(human)]
    bots = [{"text": g, "id": f"bot-{i}", "meta": {"generator": "english", "domain": "news"}} for i, g in enumerate(labelled)]

    d = dep.start()
    produce(bootstrap, completions_topic, [json.dumps({"text": g}).encode() for g in echoed])
    docs = copies + near + people + bots
    echo_expected = {x["id"] for x, e in zip(docs, echoes([x["text"] for x in docs], echoed, policy)) if e}
    rng.shuffle(docs)
    dep.produced = [json.dumps(x).encode() for x in docs]
    wait_for(lambda: d.status().get("provenance", {}).get("echo_index") == len(echoed), 120, "the echo index", 0.3, d.proc)
    produce(bootstrap, topics["docs"], dep.produced, partitions=2)
    wait_for(lambda: (s := d.status()).get("counts", {}).get("total") == len(docs) + len(echoed) and s, 180, "accounting", 0.3, d.proc)

    by_id = {r.id: r.model_dump() for r in dep.store.get_docs(dep.store.buffer_keys())}  # every field ingest stored
    generated = [x["id"] for x in copies + near]
    caught = [i for i in generated if by_id.get(i, {}).get("provenance_rule") == "echo"]
    flagged = [x["id"] for x in people if by_id.get(x["id"], {}).get("provenance") != "unknown"]
    echoing_bots = [x["id"] for x in bots if by_id.get(x["id"], {}).get("provenance_rule") == "echo"]
    missing = [x["id"] for x in docs if x["id"] not in by_id]
    print(
        f"\necho detection: {len(caught)}/{len(generated)} generated copies caught ({len(copies)} exact, {len(near)} paraphrased);"
        f" human documents flagged: {len(flagged)}/{len(people)}; labelled generations echoing: {len(echoing_bots)}/{len(bots)};"
        f" not buffered: {missing}"
    )
    assert not missing  # every message sent is distinct from the others and from the replay seed: all accepted
    # The daemon marks exactly the messages that share an echo band with an indexed completion, and only those.
    assert set(caught) == echo_expected & set(generated), sorted(echo_expected.symmetric_difference(caught) & set(generated))
    assert set(echoing_bots) == echo_expected & {x["id"] for x in bots}
    # The echo index's parameters catch the model's copies and paraphrases and leave the people alone.
    assert len(caught) >= 0.9 * len(generated)
    assert not flagged, [(i, by_id[i].get("echo_of")) for i in flagged]
    assert all(by_id[x["id"]]["provenance"] == "synthetic" for x in bots)
    counts = d.status()["provenance"]
    # labelled generations of the same model may echo an indexed completion too: counted as echoes, synthetic anyway
    assert counts["synthetic"] == len(caught) + len(bots) and counts["echo_index"] == len(echoed)
    assert counts["echoes"] == len(echo_expected) == len(caught) + len(echoing_bots)

    rid = dep.trigger(d)
    rec = dep.wait_state(rid, TERMINAL, 600, d.proc)
    cur = rec["curation"]
    assert rec["state"] != "FAILED" and rec["snapshot"] is not None, rec.get("error")
    others = 1 - sum(cur["domains"].get(k, 0.0) for k in TARGETS)
    print(
        f"round {rid} {rec['state']}: synthetic share {cur['synthetic_share']:.3f} (cap {CAP}), cap binding {cur['cap_binding']},"
        f" domains {cur['domains']} vs targets {TARGETS} (others {others:.3f} vs 0.2), waiting {cur['waiting']}"
    )
    assert cur["synthetic_share"] <= CAP + 1e-9 and cur["cap_binding"] and cur["cap_binding_rounds"] == 1
    for k, t in TARGETS.items():
        assert abs(cur["domains"].get(k, 0.0) - t) <= 0.05, (k, cur["domains"])
    assert abs(others - 0.2) <= 0.05
    assert cur["real_share"] >= policy.collapse.real_floor
    manifest = [json.loads(x) for x in Path(rec["snapshot"]["manifest"]).read_text().splitlines()]
    assert {m["provenance"] for m in manifest} <= {"human", "unknown", "synthetic"} and len(manifest) == cur["chosen_docs"]

    # Documents the cap or the domain shares left waiting are still buffered, for a later round.
    left = set(dep.store.buffer_keys())
    assert sum(cur["waiting"].values()) == len(left) - (len(by_id) - cur["pool_docs"])
    if rec["state"] in ("DEPLOYED", "REJECTED"):  # released: only real documents entered the replay reservoir
        replay = dep.store.get_docs(dep.store.replay_keys())
        assert replay and all((r.provenance or "unknown") != "synthetic" for r in replay)


def test_detector_is_calibrated_on_samples_and_separates_held_out_ones(tmp_path, english_vllm, english_model):
    """`cptd calibrate-detector` picks a threshold from one half; on the other half it still separates the two."""
    import subprocess
    import sys

    from daemon.job_launchers import Job, run_to_end
    from daemon.jobs.specs import DetectorSpec

    policy = Policy()
    # 40 human documents a half: calibrated at a 5% false-positive rate on one half, the other half's rate is a sample
    # of 40 (one document is 2.5%), so the bound below leaves room for sampling noise, not for a detector that fails.
    human = good_docs(80, policy, seed=8)
    prompts = [" ".join(d.split()[:12]) for d in english_docs(60, 1024, seed=78)]

    def usable(texts: list[str]) -> list[str]:
        return [g for g in texts if len(g.split()) >= 40]

    gens = usable(generate_until(english_vllm.url, prompts, lambda c: len(usable(c)) >= 40, seed=9, chunk=16))[:40]
    assert len(gens) >= 30
    half_h, half_g = len(human) // 2, len(gens) // 2
    files = {}
    for name, texts in {"human": human[:half_h], "generated": gens[:half_g]}.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cmd = [sys.executable, "-m", "daemon.cli", "--json", "calibrate-detector", "--human", str(files["human"])]
    cmd += ["--generated", str(files["generated"]), "--served", str(english_model), "--reference", str(english_model)]
    cmd += ["--max-false-positive", "0.05", "--device", "cpu", "--max-len", "256"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    cal = json.loads(r.stdout.strip().splitlines()[-1])

    held = tmp_path / "held.jsonl"
    rows = [{"key": f"h{i}", "text": t} for i, t in enumerate(human[half_h:])] + [
        {"key": f"g{i}", "text": t} for i, t in enumerate(gens[half_g:])
    ]
    held.write_text("".join(json.dumps(x) + "\n" for x in rows))
    model = str(english_model)
    spec = DetectorSpec(served=model, reference=model, docs_path=str(held), out=str(tmp_path / "s.json"), device="cpu", max_len=256)
    result = run_to_end(Job(spec, tmp_path / "spec.json", tmp_path / "detector.log"))  # the job as a round runs it
    scores = {x["key"]: x["score"] for x in result["rows"]}
    h = [v for k, v in scores.items() if k.startswith("h")]
    g = [v for k, v in scores.items() if k.startswith("g")]
    flagged, caught = sum(x < cal["threshold"] for x in h) / len(h), sum(x < cal["threshold"] for x in g) / len(g)
    print(
        f"\ndetector: threshold {cal['threshold']:.4f} (calibration: {cal['human_flagged']:.1%} human flagged, "
        f"{cal['generated_caught']:.1%} generated caught); held out: {flagged:.1%} of {len(h)} human flagged, "
        f"{caught:.1%} of {len(g)} generated caught"
    )
    assert caught >= 0.9 and flagged <= 0.15
