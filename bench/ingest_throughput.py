"""Ingest benchmarks, each ours vs a named baseline on the same documents, printed as ratios in one run.

1. Quality filters: our chain vs datatrove's FineWeb chain
   (GopherRepetition -> GopherQuality -> C4(filter_no_terminal_punct=False) -> FineWebQuality). Target >= 30x.
   Then the same on translated prose and junk (daemon/dev/multilingual_corpus.py, Debian's debian-handbook):
   ours with `languages: [vi, zh, ja, ru, de, ar]` (language check on, each document judged by its
   language's profile), and ours vs datatrove's chain with `language=` set per document on the languages
   datatrove can tokenize here (de, ru, ar, zh through spaCy; vi needs pyvi, ja SudachiPy).
2. MinHash signatures: ours vs datasketch with the same n-gram size and permutations. Target >= 10x.
3. End to end, Kafka -> Redis, ~4 KB documents: one `cptd run` process, then two in one group.
   Target >= 1,000 docs/s for one process, > 1.6x that with two.

    python bench/ingest_throughput.py [--docs N] [--multilingual-docs N] [--e2e-docs N] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.dev.sample_corpus import english_docs  # noqa: E402
from policies.config import Policy  # noqa: E402


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def best_of(fn, k: int = 3) -> float:
    out = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def bench_filters(docs: list[str]) -> tuple[float, float]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from policies.quality import build_filters, judge

    filters = build_filters(
        Policy().quality.model_copy(update={"language": Policy().quality.language.model_copy(update={"enabled": False})})
    )
    judge(docs[0], filters)  # compile / warm caches
    ours = best_of(lambda: [judge(d, filters) for d in docs])
    chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter()]

    def run_datatrove():
        for i, text in enumerate(docs):
            doc = Document(text=text, id=str(i))
            for f in chain:
                r = f.filter(doc)
                if not (r[0] if isinstance(r, tuple) else r):
                    break

    run_datatrove()  # warm up (tokenizer load)
    theirs = best_of(run_datatrove, 1)
    return rate(len(docs), ours), rate(len(docs), theirs)


ML_LANGS = ("vi", "zh", "ja", "ru", "de", "ar")
DATATROVE_LANGS = ("de", "ru", "ar", "zh")  # tokenizers datatrove can load here (spaCy; jieba-free zh)


def multilingual_docs(n_per_lang: int, langs: tuple[str, ...]) -> list[tuple[str, str]]:
    """(lang, text): per language, clean documents and junk made from them, 3 to 1."""
    from daemon.dev.multilingual_corpus import clean_docs, junk_docs

    out = []
    for lang in langs:
        clean = clean_docs(lang)[: n_per_lang - n_per_lang // 4]
        junk = [t for _, t in junk_docs(lang, n=n_per_lang // 4)]
        out += [(lang, t) for t in clean + junk]
    return out


def bench_filters_multilingual(n_per_lang: int) -> tuple[float, int, float, float, int]:
    """(ours with language check on all six, docs; ours and datatrove per-language on DATATROVE_LANGS, docs)."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from policies.quality import QualityPolicy, build_filters, judge

    docs = multilingual_docs(n_per_lang, ML_LANGS)
    detect = build_filters(QualityPolicy.model_validate({"language": {"languages": list(ML_LANGS)}}))
    for _, t in docs[:: max(1, len(docs) // 50)]:
        judge(t, detect)
    ours_all = best_of(lambda: [judge(t, detect) for _, t in docs])

    sub = [(lang, t) for lang, t in docs if lang in DATATROVE_LANGS]
    trusted = build_filters(QualityPolicy.model_validate({"language": {"enabled": False, "trust_lang_field": True}}))
    ours_sub = best_of(lambda: [judge(t, trusted, lang=lang) for lang, t in sub])
    chains = {
        lang: [
            GopherRepetitionFilter(language=lang),
            GopherQualityFilter(language=lang),
            C4QualityFilter(filter_no_terminal_punct=False, language=lang),
            FineWebQualityFilter(language=lang),
        ]
        for lang in DATATROVE_LANGS
    }

    def run_datatrove():
        for i, (lang, text) in enumerate(sub):
            doc = Document(text=text, id=str(i))
            for f in chains[lang]:
                r = f.filter(doc)
                if not (r[0] if isinstance(r, tuple) else r):
                    break

    run_datatrove()  # warm up (tokenizer loads)
    theirs = best_of(run_datatrove, 1)
    return rate(len(docs), ours_all), len(docs), rate(len(sub), ours_sub), rate(len(sub), theirs), len(sub)


def bench_minhash(docs: list[str]) -> tuple[float, float]:
    from datasketch import MinHash

    from policies.dedup import DedupPolicy, minhash_signatures, normalize

    dedup_policy = DedupPolicy()
    minhash_signatures(docs[:2], dedup_policy)
    ours = best_of(lambda: minhash_signatures(docs, dedup_policy))
    n, perms = dedup_policy.ngram_size, dedup_policy.num_perm

    def run_ds():
        for d in docs:
            w = normalize(d).split()
            m = MinHash(num_perm=perms, seed=dedup_policy.seed)
            m.update_batch([" ".join(w[i : i + n]).encode() for i in range(max(len(w) - n + 1, 1))])

    theirs = best_of(run_ds, 1)
    return rate(len(docs), ours), rate(len(docs), theirs)


def bench_e2e(n_docs: int, processes: int, workdir: Path, fetch_max_bytes: int | None = None) -> float:
    """Docs/s from the moment all members own partitions until every message is accounted for."""
    import httpx
    import redis
    import yaml
    from kafka import KafkaProducer

    from daemon.dev.services import create_topics, free_port, kafka_service, redis_service, wait_for

    work = Path(tempfile.mkdtemp(dir=workdir))
    rs = redis_service(work / "redis", appendonly=True).start()
    ks = kafka_service(work / "kafka").start()
    procs: list[subprocess.Popen] = []
    try:
        bootstrap = f"127.0.0.1:{ks.port}"
        create_topics(bootstrap, {"docs": 4, "dlq": 1})
        docs = english_docs(n_docs, seed=11)
        prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20)
        for i, d in enumerate(docs):
            prod.send("docs", json.dumps({"text": d, "id": str(i)}).encode())
        prod.flush()
        prod.close()
        policy = work / "policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "ingest": {
                        "topics": ["docs"],
                        "dead_letter_topic": "dlq",
                        "dead_letter_filtered": False,
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 500,
                        "batch_max_docs": 500,
                        **({"fetch_max_bytes": fetch_max_bytes} if fetch_max_bytes else {}),
                    },
                }
            )
        )
        ports = [free_port() for _ in range(processes)]
        for port in ports:
            env = dict(
                os.environ,
                CPTD_POLICY=str(policy),
                CPTD_REDIS_URL=f"redis://127.0.0.1:{rs.port}/0",
                CPTD_KAFKA_BOOTSTRAP=bootstrap,
                CPTD_HTTP_HOST="127.0.0.1",
                CPTD_HTTP_PORT=str(port),
                CPTD_LOG_LEVEL="WARNING",
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "daemon.cli", "run"],
                    env=env,
                    cwd=REPO,
                    stdout=open(work / f"cptd-{port}.log", "wb"),
                    stderr=subprocess.STDOUT,
                )
            )
        r = redis.Redis(port=rs.port)
        total = lambda: sum(int(v) for v in r.hvals("cptd:{bench}:counters"))  # noqa: E731
        # Both members must own partitions before the clock starts (a join mid-run would rebalance).
        wait_for(
            lambda: (
                all(httpx.get(f"http://127.0.0.1:{p}/status", timeout=5).json()["ingest"]["assigned"] for p in ports)
                and sum(len(httpx.get(f"http://127.0.0.1:{p}/status", timeout=5).json()["ingest"]["assigned"]) for p in ports) == 4
            ),
            120,
            "all members to own partitions",
            0.05,
        )
        start_n, t0 = total(), time.perf_counter()
        wait_for(lambda: total() >= n_docs, 600, "all documents accounted", 0.05)
        return rate(n_docs - start_n, time.perf_counter() - t0)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        ks.kill()
        rs.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=600, help="~4 KB documents for the filter and MinHash comparisons")
    ap.add_argument("--multilingual-docs", type=int, default=100, help="documents per language (3/4 clean, 1/4 junk); 0 skips")
    ap.add_argument("--e2e-docs", type=int, default=20000)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--fetch-max-bytes", type=int, default=None, help="ingest.fetch_max_bytes (default: the policy default)")
    a = ap.parse_args()
    docs = english_docs(a.docs, seed=7)
    kb = sum(len(d.encode()) for d in docs) / len(docs) / 1024
    print(f"documents: {len(docs)} of {kb:.1f} KB on average, {os.cpu_count()} CPUs")

    ours, theirs = bench_filters(docs)
    print(
        f"quality filters   ours {ours:9,.0f} docs/s   datatrove FineWeb chain {theirs:7,.0f} docs/s   "
        f"ratio {ours / theirs:6.1f}x  (target >= 30x)"
    )
    if a.multilingual_docs:
        ours_all, n_all, ours, theirs, n_sub = bench_filters_multilingual(a.multilingual_docs)
        print(f"quality filters   ours {ours_all:9,.0f} docs/s   multilingual, {n_all} docs of {'/'.join(ML_LANGS)}, language check on")
        print(
            f"quality filters   ours {ours:9,.0f} docs/s   datatrove per-language  {theirs:7,.0f} docs/s   "
            f"ratio {ours / theirs:6.1f}x  ({n_sub} docs of {'/'.join(DATATROVE_LANGS)}, language given)"
        )
    ours, theirs = bench_minhash(docs)
    print(
        f"minhash 14x8/5-gr ours {ours:9,.0f} docs/s   datasketch              {theirs:7,.0f} docs/s   "
        f"ratio {ours / theirs:6.1f}x  (target >= 10x)"
    )
    if a.skip_e2e:
        return
    with tempfile.TemporaryDirectory() as td:
        one = bench_e2e(a.e2e_docs, 1, Path(td), a.fetch_max_bytes)
        print(f"kafka->redis      1 process  {one:9,.0f} docs/s  (target >= 1,000)")
        two = bench_e2e(a.e2e_docs, 2, Path(td), a.fetch_max_bytes)
        print(f"kafka->redis      2 processes{two:9,.0f} docs/s   ratio {two / one:4.2f}x vs one  (target > 1.6x)")


if __name__ == "__main__":
    main()
