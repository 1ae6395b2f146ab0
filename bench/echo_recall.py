"""Echo detection: what share of the served model's completions is caught when they come back edited, and how many
human documents of the same domain are flagged, by resemblance alone (the echo index before containment) and with
containment (the defaults). Then what ingest's check costs per document against a real Redis, and the index's memory.

    PYTHONPATH=$PWD .venv/bin/python -m bench.echo_recall [--completions 300] [--human 1000] [--seed 1]
    PYTHONPATH=$PWD .venv/bin/python -m bench.echo_recall --completions-file gens.jsonl   # real completions instead

A completions file holds one JSON object with a "text" per line: completions a served model wrote (those of 50
words or more that pass the quality filters are used), checked against 400 human documents of the standard
library's prose (tests.streams.good_docs, seed 5) with the same edits.

The test sets are daemon/dev/echo_corpus.py's (offline, seeded): completions cut from one half of the sources,
human documents from the other half, in two domains (the standard library's docstrings, the Debian handbook).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from daemon.dev.echo_corpus import EDITS, echo_cases
from policies.collapse import CollapsePolicy
from policies.echo_containment import match_echoes


def _rates(completions: list[str], edited: dict[str, list[str]], human: list[str], policy: CollapsePolicy) -> dict[str, float]:
    out = {e: sum(m is not None for m in match_echoes(docs, completions, policy)) / len(docs) for e, docs in edited.items()}
    out["human"] = sum(m is not None for m in match_echoes(human, completions, policy)) / len(human)
    return out


def _redis_cost(completions: list[str], docs: list[str], policy: CollapsePolicy) -> dict[bool, tuple[float, float]]:
    """Without and with containment: ms per document of ingest's echo check (hashing, HMGETs, verdict) in batches of
    500, and the index's memory in bytes per completion, against a real Redis server."""
    import redis

    from connectors.redis_store import RedisStore
    from daemon.dev.services import redis_service
    from daemon.echo_lookup import find_echoes
    from policies.dedup import content_key
    from policies.echo_containment import completion_keys

    with tempfile.TemporaryDirectory() as tmp:
        svc = redis_service(Path(tmp) / "redis").start()
        try:
            client = redis.Redis(port=svc.port)
            out = {}
            for on in (False, True):
                p = policy.model_copy(update={"echo_containment": on})
                store = RedisStore(client, f"bench{int(on)}")
                base = int(client.info("memory")["used_memory"])
                store.echo_add([(content_key(c), k) for c, k in zip(completions, completion_keys(completions, p), strict=True)], 10**9)
                memory = (int(client.info("memory")["used_memory"]) - base) / len(completions)
                find_echoes(store, docs[:10], [], p)  # numba kernels loaded before timing
                t0 = time.perf_counter()
                for i in range(0, len(docs), 500):
                    find_echoes(store, docs[i : i + 500], [], p)
                out[on] = ((time.perf_counter() - t0) * 1000 / len(docs), memory)
        finally:
            svc.kill()
    return out


def _from_file(path: Path, policy: CollapsePolicy) -> None:
    import json
    import random

    from daemon.dev.echo_corpus import edit_all
    from policies.config import Policy
    from policies.quality import build_filters, judge
    from tests.streams import good_docs

    filters = build_filters(Policy().quality)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    gens = [t for t in texts if len(t.split()) >= 50 and judge(t, filters).accepted]
    human = good_docs(400, Policy(), seed=5)
    edited = edit_all(gens, human, random.Random(0))
    words = sum(len(g.split()) for g in gens) / max(len(gens), 1)
    print(f"{len(gens)} of {len(texts)} completions usable ({words:.0f} words on average), {len(human)} human documents:")
    for name, p in (("resemblance (before)", policy.model_copy(update={"echo_containment": False})), ("+ containment", policy)):
        r = _rates(gens, edited, human, p)
        caught = ", ".join(f"{k} {v:.1%}" for k, v in r.items() if k != "human")
        print(f"{name}: {caught}; human {round(r['human'] * len(human))}/{len(human)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--completions", type=int, default=300)
    ap.add_argument("--human", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--completions-file", type=Path, help="JSON lines of real completions, instead of the offline sets")
    args = ap.parse_args()
    policy = CollapsePolicy()
    if args.completions_file:
        _from_file(args.completions_file, policy)
        return
    before = policy.model_copy(update={"echo_containment": False})
    cols = [*EDITS, "human"]
    print(f"{args.completions} completions indexed, one edited copy of each, {args.human} human documents; per domain:")
    print(f"| domain | matching | {' | '.join(cols)} |")
    print(f"|---|---|{'---|' * len(cols)}")
    all_human: list[str] = []
    all_completions: list[str] = []
    for domain in ("stdlib", "handbook"):
        cases = echo_cases(domain, args.completions, args.human, seed=args.seed)
        all_human += cases.human
        all_completions += cases.completions
        for name, p in (("resemblance (before)", before), ("+ containment (default)", policy)):
            r = _rates(cases.completions, cases.edited, cases.human, p)
            cells = [f"{r[c]:.1%}" if c != "human" else f"{round(r[c] * len(cases.human))}/{len(cases.human)}" for c in cols]
            print(f"| {domain} | {name} | {' | '.join(cells)} |")
    words = sum(len(d.split()) for d in all_human) / len(all_human)
    for on, (ms, memory) in _redis_cost(all_completions, all_human, policy).items():
        print(
            f"{'with containment' if on else 'bands only (before)'}: ingest's echo check {ms:.2f} ms per document "
            f"({len(all_human)} human documents of {words:.0f} words on average, batches of 500, {len(all_completions)} "
            f"completions indexed in a real Redis); index memory {memory:,.0f} B per completion"
        )


if __name__ == "__main__":
    main()
