"""Where a round's documents go when it ends.

SNAPSHOT moved them from the buffer into the round's list. A round that FAILED
gives them back to the front of the buffer, so the next round trains them
(`requeue`). Once training used them (DEPLOYED, REJECTED, ROLLED_BACK) they
are offered to the replay reservoir, the real ones only, and leave the buffer
for good (`release`).
"""

from __future__ import annotations

import random

from connectors.redis_store import StoredDoc
from daemon.round_record import DocsFate, RoundRecord
from daemon.rounds.context import RoundContext
from daemon.rounds.pool_choice import read_decision
from policies.replay import reservoir_slot


def requeue(ctx: RoundContext, rec: RoundRecord) -> DocsFate:
    n = ctx.store.requeue_round(ctx.fenced(), rec.id)
    return DocsFate(fate="requeued", docs=n)


def release(ctx: RoundContext, rec: RoundRecord) -> DocsFate:
    """Trained documents become replay candidates (Algorithm R under the cap) and leave the buffer."""
    policy = ctx.policy_of(rec)
    keys = ctx.store.round_docs(rec.id)
    docs = replay_admitted(ctx, rec, ctx.store.get_docs(keys))
    rng = random.Random(f"{rec.id}:replay")
    placed = ctx.store.replay_offer(docs, policy.replay.reservoir_docs, rng.random, reservoir_slot) if docs else 0
    ctx.store.remove_docs(keys)
    ctx.store.drop_round_list(ctx.fenced(), rec.id)
    return DocsFate(fate="released", docs=len(keys), replay_placed=placed)


def replay_admitted(ctx: RoundContext, rec: RoundRecord, docs: list[StoredDoc]) -> list[StoredDoc]:
    """The documents the reservoir may take: provenance in collapse.replay_admits, not flagged by the detector."""
    decision = read_decision(ctx, rec.id)
    flagged = {k for k, s in decision.scores.items() if s.suspected} if decision else set()
    admits = set(ctx.policy_of(rec).collapse.replay_admits)
    return [d for d in docs if (d.provenance or "unknown") in admits and d.key not in flagged]
