"""Clean prose accepted per language with `languages: [L]` and nothing else, and language-check rejections on
technical prose: the figures of docs/ingest.md (Languages without a profile).

    PYTHONPATH=. python bench/language_acceptance.py

Text from daemon/dev/multilingual_corpus.py: translated man pages (`manpage_docs`), handbook prose
(`clean_docs`) and handbook sections with their command screens (`section_docs`). Run it on an older
checkout's policies/ for the before figures (`git archive bc69274 policies | tar -x -C /tmp/before`, then
`PYTHONPATH=/tmp/before:. python bench/language_acceptance.py`). ~30 s on 2 cores.
"""

from __future__ import annotations

import random
from collections import Counter

from daemon.dev import multilingual_corpus as mc
from policies.language_calibration import calibrate_profile
from policies.quality import QualityPolicy, build_filters, judge

ROWS = [("en", "man"), ("ko", "man"), ("uk", "man"), ("fr", "man"), ("en", "handbook"), ("fa", "handbook"), ("fr", "handbook")]
LANGUAGE_RULES = ("language_not_allowed", "language_low_score")


def main() -> None:
    print(f"{'lang':4s} {'text':9s} {'docs':>5s} {'accepted':>9s}  language-rejected  most frequent rejections")
    rows = ROWS + [(lang, "sections") for lang in ("en", "fr", "de", "es", "fa")]
    for lang, source in rows:
        docs = {"man": mc.manpage_docs, "handbook": mc.clean_docs, "sections": mc.section_docs}[source](lang)
        filters = build_filters(QualityPolicy.model_validate({"language": {"languages": [lang]}}))
        reasons = Counter(judge(d, filters).reason for d in docs)
        accepted = reasons.pop(None, 0)
        lang_rej = sum(reasons[r] for r in LANGUAGE_RULES)
        print(
            f"{lang:4s} {source:9s} {len(docs):5d} {accepted / len(docs):9.1%}  {lang_rej / len(docs):17.1%}  "
            f"{', '.join(f'{r} {n}' for r, n in reasons.most_common(3))}",
            flush=True,
        )
    round_trip()


def round_trip() -> None:
    """calibrate-language on one half of a language's documents, judged on the other half; junk of the language too."""
    print("\ncalibrated on half (shuffled, seed 0), judged on the other half")
    for lang, docs in [
        ("uk", mc.manpage_docs("uk")),
        ("ko", mc.manpage_docs("ko")),
        ("fa", mc.clean_docs("fa")),
        ("fr", mc.clean_docs("fr")),
        ("en", mc.manpage_docs("en")),
    ]:
        docs = list(docs)
        random.Random(0).shuffle(docs)
        fit, held_out = docs[::2], docs[1::2]
        profile = calibrate_profile(lang, fit).profile.overrides()
        filters = build_filters(QualityPolicy.model_validate({"language": {"languages": [lang]}, "profiles": {lang: profile}}))
        kept = sum(judge(d, filters).accepted for d in held_out) / len(held_out)
        junk = mc.junk_docs(lang) if lang != "uk" else []  # junk is made from handbook text: none in Ukrainian
        line = f"{lang}: {len(fit)} to calibrate, {len(held_out)} held out, {kept:.1%} accepted"
        if junk:
            line += f", junk {sum(not judge(t, filters).accepted for _, t in junk) / len(junk):.1%} rejected"
        print(line, flush=True)


if __name__ == "__main__":
    main()
