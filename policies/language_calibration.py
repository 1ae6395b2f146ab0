"""A language profile derived from a clean sample of the language: what `cptd calibrate-language` prints.

FineWeb-2 sets its per-language filter thresholds from the distributions of the
statistics the filters measure on each language's corpus, rather than reusing
English values. This module does the same on an operator's sample of clean
documents: for every statistic a language-dependent rule compares with a
threshold, the threshold is put just past the tail of the sample's distribution
(the `tail` quantile for a minimum, 1 - `tail` for a maximum) and widened by a
relative `margin`, so that clean text of the language breaks each rule about as
rarely as English text breaks the English defaults. Stop words are the words
found in the most documents of the sample.

Rules about length and layout (minimum/maximum words, '#' and ellipsis ratios,
bullet lines, line duplicates, words per line, short lines, newlines per word)
say what a document must be, not how a language is written; they depend on how
the sample's documents are laid out (one line per paragraph gives no short
lines at all, and a threshold of 0), so they keep the policy's sections or the
language's built-in/generic profile. Segmentation is the script's.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from policies.language_profiles import BUILTIN_PROFILES, LanguageProfile, check_language_code, generic_profile
from policies.quality import Doc, Profile, QualityPolicy, resolve_profile
from policies.text_statistics import sentence_count
from policies.word_segmentation import F_ALPHA, TERMINAL_PUNCTUATION, VOCAB

MIN_DOCS = 20
_TERMINAL = tuple(TERMINAL_PUNCTUATION)


@dataclass(frozen=True)
class Calibration:
    """A profile derived from `docs` documents of `lang`, and where its rules started from."""

    lang: str
    base: str  # "built-in profile" or "generic <script> profile"
    docs: int
    tail: float
    margin: float
    profile: LanguageProfile

    def yaml(self) -> str:
        """The profile as the policy file takes it, under quality.profiles.<lang>, with a comment saying where it came from."""
        body = yaml.safe_dump(
            {"quality": {"profiles": {self.lang: self.profile.overrides()}}}, allow_unicode=True, sort_keys=False, width=120
        )
        head = (
            f"# calibrated for {self.lang!r} from {self.docs} clean documents (started from its {self.base}; "
            f"thresholds at the {self.tail:.0%} tails of the sample, widened by {self.margin:.0%})\n"
        )
        return head + body


def read_sample(path: str | Path) -> list[str]:
    """Documents of a sample file: JSONL with a `text` field per line (as seed-replay takes), or plain text with
    documents separated by form feeds or by lines holding only `---`."""
    p = Path(path)
    raw = p.read_text(encoding="utf-8")
    if p.suffix in (".jsonl", ".json"):
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a JSON object with a 'text' field ({e})") from None
            if isinstance(text, str) and text.strip():
                docs.append(text)
        return docs
    parts = raw.split("\f") if "\f" in raw else raw.split("\n---\n")
    return [d.strip() for d in parts if d.strip()]


def _stop_words(docs: list[Doc], n: int) -> list[str]:
    """The `n` words with a letter found in the most documents (ties: the more frequent word overall first)."""
    df: Counter[int] = Counter()
    tf: Counter[int] = Counter()
    for d in docs:
        ids = d.stats.word_ids
        tf.update(ids.tolist())
        df.update(set(ids.tolist()))
    words = {i: w for w, i in VOCAB.ids.items()}
    ranked = sorted(df, key=lambda i: (-df[i], -tf[i]))
    return [words[i] for i in ranked if VOCAB.flags[i] & F_ALPHA and len(words[i].split()) == 1][:n]


def _line_statistics(d: Doc, base: Profile) -> tuple[int, float]:
    """(sentences, share of lines ending in terminal punctuation) of the C4-cleaned text."""
    r = d.c4(base.c4)
    text = "\n".join(r.kept).strip()
    lines = [ln for ln in text.split("\n") if ln.strip()]
    sentences = sum(sentence_count(line, base.segmentation) for line in r.kept)
    return sentences, sum(ln.endswith(_TERMINAL) for ln in lines) / (len(lines) or 1)


def sample_statistics(lang: str, texts: list[str], base: Profile, stop_words: list[str]) -> dict[str, np.ndarray]:
    """Per document of the sample, each statistic a calibrated rule compares with its threshold."""
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        if not math.isnan(value):
            rows.setdefault(name, []).append(value)

    for text in texts:
        d = Doc(text, profile_of=lambda _d: base)
        wc = d.stats.word_counts(stop_words)
        chars = d.stats.chars or 1
        g = d.stats.ngrams
        add("mean_word_length", wc.mean_word_length)
        add("alpha_words_ratio", wc.alpha_fraction)
        add("stop_words", wc.stop_words)
        for k in (2, 3, 4):
            add(f"top_{k}_gram_frac", getattr(g, f"top_{k}") / chars)
        for k in range(5, 11):
            add(f"dup_{k}_gram_frac", getattr(g, f"dup_{k}") / chars)
        sentences, punct = _line_statistics(d, base)
        add("sentences", sentences)
        add("line_punct_ratio", punct)
    return {k: np.asarray(v, np.float64) for k, v in rows.items()}


def _down(x: float) -> float:
    return math.floor(x * 1000) / 1000


def _up(x: float) -> float:
    return math.ceil(x * 1000) / 1000


def calibrate_profile(lang: str, texts: list[str], tail: float = 0.01, margin: float = 0.1, n_stop_words: int = 30) -> Calibration:
    """Thresholds from the sample's distributions (see the module docstring); refuses a sample too small to have tails."""
    check_language_code(lang)
    if not 0.0 <= tail < 0.5:
        raise ValueError(f"tail must be in [0, 0.5), got {tail}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    texts = [t for t in texts if t.strip()]
    if len(texts) < MIN_DOCS:
        raise ValueError(f"a sample of at least {MIN_DOCS} documents is needed to calibrate {lang!r}, got {len(texts)}")
    VOCAB.restart_if_full()
    base = resolve_profile(QualityPolicy(), lang)
    docs = [Doc(t, profile_of=lambda _d: base) for t in texts]
    stop = _stop_words(docs, n_stop_words)
    s = sample_statistics(lang, texts, base, stop)

    def lo(name: str) -> float:
        return float(np.quantile(s[name], tail)) if name in s else math.nan

    def hi(name: str) -> float:
        return float(np.quantile(s[name], 1.0 - tail)) if name in s else math.nan

    q = base.gopher_quality
    out: dict[str, Any] = {"segmentation": base.segmentation, "stop_words": stop}
    out["min_stop_words"] = int(min(q.min_stop_words or 2, 2, math.floor(lo("stop_words"))))
    out["min_mean_word_length"] = _down(lo("mean_word_length") * (1 - margin))
    out["max_mean_word_length"] = _up(hi("mean_word_length") * (1 + margin))
    out["min_alpha_words_ratio"] = _down(lo("alpha_words_ratio") * (1 - margin))
    for k in (2, 3, 4):
        out[f"max_top_{k}_gram_frac"] = min(1.0, _up(hi(f"top_{k}_gram_frac") * (1 + margin)))
    for k in range(5, 11):
        out[f"max_dup_{k}_gram_frac"] = min(1.0, _up(hi(f"dup_{k}_gram_frac") * (1 + margin)))
    out["min_sentences"] = max(1, min(base.c4.min_sentences, math.floor(lo("sentences"))))
    out["min_line_punct_ratio"] = _down(lo("line_punct_ratio") * (1 - margin))
    profile = LanguageProfile.model_validate({k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))})
    where = "built-in profile" if lang in BUILTIN_PROFILES else f"generic {generic_profile(lang)[0]} profile"
    return Calibration(lang, where, len(texts), tail, margin, profile)
