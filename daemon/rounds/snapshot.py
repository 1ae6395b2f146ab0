"""SNAPSHOT: the round takes its documents from the buffer, writes its data files, and sets its drift response.

The documents move in one fenced Lua call (`snapshot_take.lua`) that returns
the same list when repeated, so a resumed SNAPSHOT takes the same documents:
the ones curation chose (pool_choice.py) or, with curation off, the oldest up
to the budget. Then a hash-ranked slice is held out for evaluation, the replay
reservoir is split into a training half and a held-out half, the files the
jobs read are written, the drift probe scores new against replay under the
parent, and policies/drift.py turns that into the replay ratio, peak LR and
re-warm length the trainer gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.redis_store import StoredDoc
from daemon import failpoints
from daemon import metrics as M
from daemon.round_record import DriftRecord, LanguageMixRecord, OffsetRange, RoundRecord, RoundState, Snapshot
from daemon.rounds import pool_choice
from daemon.rounds.context import RoundContext, RoundFailed, write_jsonl, write_texts
from daemon.rounds.drift_measure import measure_for_round
from policies.config import Policy
from policies.drift import adjust_for_drift, apply_to_schedule
from policies.language_mix import draw_by_language, replay_shares, shares
from policies.round_policy import estimate_tokens, split_heldout


def snapshot(ctx: RoundContext, rec: RoundRecord) -> None:
    policy = ctx.policy_of(rec)
    rid = rec.id
    budget = int(policy.rounds.budget_tokens * policy.rounds.bytes_per_token)
    data = ctx.round_dir(rid) / "data"
    data.mkdir(parents=True, exist_ok=True)
    chosen: list[str] = []
    pool: dict[str, StoredDoc] = {}  # the candidates' records, already read: not read again below
    if not ctx.store.round_docs(rid):  # a resumed SNAPSHOT whose documents already moved keeps its selection
        chosen, pool = pool_choice.choose(ctx, policy, rec, budget)
    keys = ctx.store.snapshot_take(ctx.fenced(), rid, budget, chosen=chosen)
    failpoints.hit("snapshot.taken")
    if not keys:
        raise RoundFailed("SNAPSHOT: the buffer is empty", requeue=False)
    decision = pool_choice.apply_after_take(ctx, rid, keys)
    docs = {d.key: d for d in ctx.store.get_docs([k for k in keys if k not in pool])}
    docs.update((k, pool[k]) for k in keys if k in pool)
    missing = [k for k in keys if k not in docs]
    if missing:
        raise RoundFailed(f"SNAPSHOT: {len(missing)} document records missing from Redis (e.g. {missing[0]})")
    train_keys, held_keys = split_heldout(keys, policy.rounds.heldout_frac, policy.rounds.heldout_max_docs, rid)
    replay_all = sorted(ctx.store.replay_keys())
    replay_train, replay_held = (
        split_heldout(replay_all, 0.5, policy.rounds.replay_heldout_docs, rid + ":replay") if len(replay_all) >= 2 else (replay_all, [])
    )
    replay_docs = {d.key: d for d in ctx.store.get_docs(replay_train + replay_held)}
    scores = decision.scores if decision else {}
    held = set(held_keys)
    manifest = [
        {
            **{f: getattr(docs[k], f) for f in pool_choice.MANIFEST_FIELDS},
            "heldout": k in held,
            **(scores[k].model_dump(exclude_none=True) if k in scores else {}),
        }
        for k in keys
    ]
    sha = write_jsonl(data / "manifest.jsonl", manifest)
    write_texts(data / "new.jsonl", [docs[k].text for k in train_keys])
    write_texts(data / "heldout_new.jsonl", [docs[k].text for k in held_keys])
    write_texts(data / "replay.jsonl", [replay_docs[k].text for k in replay_train if k in replay_docs])
    write_texts(data / "heldout_replay.jsonl", [replay_docs[k].text for k in replay_held if k in replay_docs])
    nbytes = sum(docs[k].bytes for k in keys)
    stats = measure_for_round(ctx, rec, data / "new.jsonl", data / "replay.jsonl")
    response = adjust_for_drift(stats, policy.drift, policy.replay)
    rec.snapshot = Snapshot(
        docs=len(keys),
        train_docs=len(train_keys),
        heldout_docs=len(held_keys),
        bytes=nbytes,
        tokens_estimate=estimate_tokens(nbytes, policy.rounds),
        manifest=str(data / "manifest.jsonl"),
        manifest_sha256=sha,
        kafka_offsets=offset_ranges([docs[k] for k in keys]),
        replay_docs=len(replay_train),
        replay_heldout_docs=len(replay_held),
    )
    rec.drift = DriftRecord.model_validate(response.to_record())
    rec.replay_ratio = response.replay_ratio if replay_train else 0.0
    replay_pool = [replay_docs[k] for k in replay_train if k in replay_docs]
    rec.language_mix = language_mix(policy, [docs[k] for k in train_keys], replay_pool, rec.replay_ratio, data)
    rec.curation = pool_choice.curation_record(ctx, decision, policy, rec.replay_ratio)
    rec.schedule = apply_to_schedule(policy.schedule, response)
    if response.score is not None and response.stats is not None:
        M.DRIFT_SCORE.labels(statistic="score").set(response.score)
        M.DRIFT_SCORE.labels(statistic="ppl_gap").set(response.stats.ppl_gap)
        M.DRIFT_SCORE.labels(statistic="js_distance").set(response.stats.js_distance)
        if response.stats.fertility_ratio is not None:
            M.DRIFT_SCORE.labels(statistic="fertility_ratio").set(response.stats.fertility_ratio)
    M.REPLAY_RATIO.set(rec.replay_ratio)
    ctx.enter(rec, RoundState.TRAINING)


def offset_ranges(docs: list[StoredDoc]) -> dict[str, OffsetRange]:
    """The Kafka offsets the round's documents came from, per "topic|partition" (seeded documents have none)."""
    ranges: dict[str, OffsetRange] = {}
    for d in docs:
        if d.topic is None or d.partition is None or d.offset is None:
            continue
        topic_partition = f"{d.topic}|{d.partition}"
        r = ranges.get(topic_partition)
        if r is None:
            ranges[topic_partition] = OffsetRange(first=d.offset, last=d.offset, docs=1)
        else:
            r.first, r.last, r.docs = min(r.first, d.offset), max(r.last, d.offset), r.docs + 1
    return dict(sorted(ranges.items()))


def language_mix(policy: Policy, new: list[StoredDoc], pool: list[StoredDoc], ratio: float, data: Path) -> LanguageMixRecord:
    """Language shares of the round; with targets, the replay the trainer reads is redrawn towards them."""

    def sizes(docs: list[Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in docs:
            lang = d.language or "unknown"
            out[lang] = out.get(lang, 0.0) + d.bytes
        return out

    new_sizes = sizes(new)
    wanted = replay_shares(new_sizes, ratio, policy.language_mix.targets)
    drawn = draw_by_language(pool, wanted) if wanted else pool
    if wanted:
        write_texts(data / "replay.jsonl", [d.text for d in drawn])
    n, r = sum(new_sizes.values()), sum(d.bytes for d in drawn)
    mixture = {lang: (1 - ratio) * x for lang, x in shares(new_sizes).items()}
    for lang, x in shares(sizes(drawn)).items():
        mixture[lang] = mixture.get(lang, 0.0) + ratio * x
    return LanguageMixRecord(
        targets=dict(policy.language_mix.targets),
        new=shares(new_sizes),
        replay_available=shares(sizes(pool)),
        replay_wanted=wanted,
        replay=shares(sizes(drawn)),
        mixture=dict(sorted(mixture.items())) if n and r else shares(new_sizes),
        replay_docs=len(drawn),
    )
