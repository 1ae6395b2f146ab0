"""Echo detection: what share of the served model's completions is caught when they come back edited, and how many
human documents of the same domain are flagged, by resemblance alone (the echo index before containment), by
containment on the 1-in-4 sample only (`echo_dense_words: 0`), and with the defaults (short texts sampled densely
too). Then what ingest's check costs per document against a real Redis, and the index's memory.

    PYTHONPATH=$PWD .venv/bin/python -m bench.echo_recall [--completions 300] [--human 1000] [--seed 1]
    PYTHONPATH=$PWD .venv/bin/python -m bench.echo_recall --generate 640 [--detector]  # the demo model's own
    PYTHONPATH=$PWD .venv/bin/python -m bench.echo_recall --completions-file gens.jsonl   # real completions instead

`--generate N` builds the collapse test's served model, serves it with vLLM on the CPU and samples N completions
(bench/echo_completions.py), cached under `--cache`; `--completions-file` reads completions a served model wrote
(one JSON object with a "text" per line). Either way those of 50 words or more that pass the quality filters are
used, checked against `--human` human documents of the standard library's prose (tests.streams.good_docs, seed 5)
with the same edits. `--detector` (with `--generate`) also scores them with the Binoculars detector
(daemon/jobs/generated_text_detector.py, the cached model as served and base), its threshold calibrated at 1% of
other human documents (seed 6), and says what it adds where shingles miss.

The offline test sets are daemon/dev/echo_corpus.py's (seeded): completions cut from one half of the sources,
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


def _variants(policy: CollapsePolicy) -> list[tuple[str, CollapsePolicy]]:
    return [
        ("resemblance (before)", policy.model_copy(update={"echo_containment": False})),
        ("+ containment, 1-in-4 sample only", policy.model_copy(update={"echo_dense_words": 0})),
        ("+ dense sample of short texts (default)", policy),
    ]


def _rates(completions: list[str], edited: dict[str, list[str]], human: list[str], policy: CollapsePolicy) -> dict[str, float]:
    out = {e: sum(m is not None for m in match_echoes(docs, completions, policy)) / len(docs) for e, docs in edited.items()}
    out["human"] = sum(m is not None for m in match_echoes(human, completions, policy)) / len(human)
    return out


def _redis_cost(completions: list[str], docs: list[str], variants: list[tuple[str, CollapsePolicy]]) -> dict[str, tuple[float, float]]:
    """Per variant: ms per document of ingest's echo check (hashing, HMGETs, verdict) in batches of 500, and the
    index's memory in bytes per completion, against a real Redis server."""
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
            for i, (name, p) in enumerate(variants):
                store = RedisStore(client, f"bench{i}")
                base = int(client.info("memory")["used_memory"])
                store.echo_add([(content_key(c), k) for c, k in zip(completions, completion_keys(completions, p), strict=True)], 10**9)
                memory = (int(client.info("memory")["used_memory"]) - base) / len(completions)
                find_echoes(store, docs[:10], [], p)  # numba kernels loaded before timing
                t0 = time.perf_counter()
                for j in range(0, len(docs), 500):
                    find_echoes(store, docs[j : j + 500], [], p)
                out[name] = ((time.perf_counter() - t0) * 1000 / len(docs), memory)
        finally:
            svc.kill()
    return out


def _print_cost(completions: list[str], docs: list[str], variants: list[tuple[str, CollapsePolicy]]) -> None:
    words = sum(len(d.split()) for d in docs) / len(docs)
    for name, (ms, memory) in _redis_cost(completions, docs, variants).items():
        print(
            f"{name}: ingest's echo check {ms:.2f} ms per document ({len(docs)} documents of {words:.0f} words on average, "
            f"batches of 500, {len(completions)} completions indexed in a real Redis); index memory {memory:,.0f} B per completion"
        )


def _from_file(path: Path, policy: CollapsePolicy, n_human: int, model: Path | None = None) -> None:
    import json
    import random

    from daemon.dev.echo_corpus import edit_all
    from policies.config import Policy
    from policies.quality import build_filters, judge
    from tests.streams import good_docs

    filters = build_filters(Policy().quality)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    gens = list(dict.fromkeys(t for t in texts if len(t.split()) >= 50 and judge(t, filters).accepted))
    human = good_docs(n_human, Policy(), seed=5)
    edited = edit_all(gens, human, random.Random(0))
    words = sum(len(g.split()) for g in gens) / max(len(gens), 1)
    print(f"{len(gens)} of {len(texts)} completions usable ({words:.0f} words on average), {len(human)} human documents:")
    cols = [*EDITS, "human"]
    print(f"| matching | {' | '.join(cols)} |")
    print(f"|---|{'---|' * len(cols)}")
    caught: dict[str, list[bool]] = {}
    for name, p in _variants(policy):
        r = _rates(gens, edited, human, p)
        cells = [f"{r[c]:.1%}" if c != "human" else f"{round(r[c] * len(human))}/{len(human)}" for c in cols]
        print(f"| {name} | {' | '.join(cells)} |")
        caught[name] = [m is not None for m in match_echoes(edited["rewrite25"], gens, p)]
    _print_cost(gens, human, _variants(policy)[1:])
    if model is not None:
        _detector(model, gens, edited, human, caught)


def _detector(model: Path, gens: list[str], edited: dict[str, list[str]], human: list[str], caught: dict[str, list[bool]]) -> None:
    """The second line (issue 26, item 5): the Binoculars score of each text (its first 128 tokens), with the model
    as served and as base (no round has run), a threshold at 1% of 400 other human documents (seed 6), and what it
    flags of the quarter-rewrites and of 400 of the human documents, alone and where the shingles missed."""
    import torch

    from daemon.jobs.generated_text_detector import binoculars
    from daemon.jobs.model_loader import load_causal_lm, load_tokenizer
    from policies.collapse import calibrate
    from policies.config import Policy
    from tests.streams import good_docs

    lm, tok = load_causal_lm(model, device="cpu", dtype=torch.float32), load_tokenizer(model)
    held = set(human)
    others = [d for d in good_docs(600, Policy(), seed=6) if d not in held][:400]

    def scores(texts: list[str]) -> list[float]:
        return [r["score"] if r["score"] is not None else float("inf") for r in binoculars(lm, lm, tok, texts, max_len=128)]

    t0 = time.perf_counter()
    rewrites = scores(edited["rewrite25"])
    cal = calibrate(scores(others), rewrites, max_false_positive=0.01)
    people = [x < cal.threshold for x in scores(human[:400])]
    ms = (time.perf_counter() - t0) * 1000 / (len(others) + len(gens) + len(people))
    print(
        f"detector: threshold {cal.threshold:.4f} at {cal.human_flagged:.1%} of {len(others)} other human documents "
        f"({ms:.0f} ms per document on this CPU); quarter-rewrites flagged {cal.generated_caught:.1%}, "
        f"human {sum(people)}/{len(people)}"
    )
    flagged = [x < cal.threshold for x in rewrites]
    for name, hits in caught.items():
        either = [a or b for a, b in zip(hits, flagged, strict=True)]
        print(f"rewrite25, {name} or the detector: {sum(either) / len(either):.1%} (shingles alone {sum(hits) / len(hits):.1%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--completions", type=int, default=300)
    ap.add_argument("--human", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--completions-file", type=Path, help="JSON lines of real completions, instead of the offline sets")
    ap.add_argument("--generate", type=int, metavar="N", help="sample N completions of the demo model (vLLM, CPU) and use those")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cptd-echo-completions", help="--generate's model and file")
    ap.add_argument("--detector", action="store_true", help="with --generate: what the Binoculars detector adds, at 1%% human FP")
    args = ap.parse_args()
    policy = CollapsePolicy()
    if args.generate:
        from bench.echo_completions import completions_file

        model = args.cache / "model" / "checkpoints" / "base" if args.detector else None
        _from_file(completions_file(args.cache, args.generate), policy, args.human, model)
        return
    if args.completions_file:
        _from_file(args.completions_file, policy, args.human)
        return
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
        for name, p in _variants(policy):
            r = _rates(cases.completions, cases.edited, cases.human, p)
            cells = [f"{r[c]:.1%}" if c != "human" else f"{round(r[c] * len(cases.human))}/{len(cases.human)}" for c in cols]
            print(f"| {domain} | {name} | {' | '.join(cells)} |")
    bands_only = ("bands only (before)", policy.model_copy(update={"echo_containment": False}))
    _print_cost(all_completions, all_human, [bands_only, *_variants(policy)[1:]])


if __name__ == "__main__":
    main()
