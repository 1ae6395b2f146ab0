"""Document quality filters: one rule, one reason code, thresholds from the policy file.

The rules are the FineWeb pipeline's heuristic filters as datatrove implements
them (Gopher repetition -> Gopher quality -> C4 lines -> FineWeb quality), with
datatrove's default thresholds as our defaults, plus an offline language check
that runs first (as FineWeb's own language filter does) so that a German page
is reported as `language_not_allowed` rather than as a page missing English
stop words. Operators compare our rejection counts with published FineWeb
numbers, so what each rule measures follows datatrove closely; we only change
how it is computed, because datatrove's chain runs at ~50 docs/s and ingest
needs thousands.

Why it is fast
    * Words. datatrove splits words with spaCy's English tokenizer. We split a
      document on whitespace (as spaCy does first) and look every chunk up in a
      memo of chunk -> word ids; only unseen chunks go through `_split_chunk`,
      our re-implementation of spaCy's prefix/suffix/infix rules and its common
      special cases (contractions, abbreviations). Word statistics then come
      from numpy arrays indexed by word id (length, has-a-letter, is-a-symbol).
      The memo and the vocabulary are bounded and simply start over when full.
    * n-grams. Top n-gram and duplicated n-gram character fractions run in one
      numba kernel over the word-id array (rolling 64-bit n-gram hashes in an
      open-addressing table), reproducing datatrove's greedy skip-ahead count.
    * Language. py3langid's model (shipped inside its wheel; nothing is
      downloaded) with its byte-level feature walk done in numba; py3langid's
      own walk is a Python loop over every byte (~3 ms per 4 KB document).
      Only the first `language.max_chars` (600) characters are classified: the
      model's 57 MB weight table is read at random, one row per distinct byte
      n-gram, so cost grows with the sample. On 3,000 good 4 KB documents 600
      characters rejected none, and on a 3,000-document mixed corpus 99.6% of
      accept/reject decisions equal those made on 1,000 characters, for ~10%
      more end-to-end ingest throughput.
    * Everything per document is computed once, lazily, on a `Doc` that all
      rules share, so a document rejected early pays only for what it used.

Agreement with datatrove
    Verdicts agree with datatrove's chain on >= 97% of `daemon.dev.sample_corpus.mixed_corpus`
    (tests/test_quality_datatrove.py). The remaining differences come from
    tokenization corner cases (spaCy's long exception list, URLs, emoticons) on
    documents that sit on a threshold, and from n-grams compared by word ids
    instead of joined strings.

C4 line removal and cleaned text (decision)
    datatrove's C4 filter does not only accept or reject: it drops lines (too
    few words, "javascript", cookie/terms-of-use lines, over-long words), strips
    the rest, removes Wikipedia-style citations, and hands the cleaned text to
    the FineWeb filter. We do the same, because FineWeb's line ratios measured
    on the raw text disagree with datatrove on many pages (every blank line and
    menu item would count). `judge` therefore returns the cleaned text in
    `Verdict.text` when the document is accepted and the C4 family is enabled
    (None otherwise: the original text is what was judged). The ingest loop
    should store `verdict.text or original` (it is what FineWeb keeps) and
    compute exact hashes and MinHash on that same string.

Threading
    The word memo is process-global and not locked; call `judge` from one
    thread per process (the ingest loop does).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
from numba import njit
from pydantic import Field, field_validator, model_validator

from policies.base import Section
from policies.language_profiles import BUILTIN_PROFILES, LanguageProfile, Segmentation, check_language_code, normalize_lang_field
from policies.word_segmentation import segment

# --------------------------------------------------------------------------- policy


class GopherRepetitionPolicy(Section):
    """Gopher (Rae et al. 2021, table A1) repetition limits; fractions of the document's characters or units."""

    enabled: bool = True
    max_dup_para_frac: float = Field(default=0.3, ge=0.0, le=1.0, description="duplicated paragraphs / paragraphs")
    max_dup_para_char_frac: float = Field(default=0.2, ge=0.0, le=1.0, description="chars in duplicated paragraphs / chars")
    max_dup_line_frac: float = Field(default=0.3, ge=0.0, le=1.0, description="duplicated lines / lines")
    max_dup_line_char_frac: float = Field(default=0.2, ge=0.0, le=1.0, description="chars in duplicated lines / chars")
    max_top_2_gram_frac: float = Field(default=0.20, ge=0.0, le=1.0, description="chars covered by the most frequent 2-gram")
    max_top_3_gram_frac: float = Field(default=0.18, ge=0.0, le=1.0)
    max_top_4_gram_frac: float = Field(default=0.16, ge=0.0, le=1.0)
    max_dup_5_gram_frac: float = Field(default=0.15, ge=0.0, le=1.0, description="chars in repeated 5-grams")
    max_dup_6_gram_frac: float = Field(default=0.14, ge=0.0, le=1.0)
    max_dup_7_gram_frac: float = Field(default=0.13, ge=0.0, le=1.0)
    max_dup_8_gram_frac: float = Field(default=0.12, ge=0.0, le=1.0)
    max_dup_9_gram_frac: float = Field(default=0.11, ge=0.0, le=1.0)
    max_dup_10_gram_frac: float = Field(default=0.10, ge=0.0, le=1.0)


class GopherQualityPolicy(Section):
    """Gopher quality heuristics; 'words' are spaCy-style tokens, punctuation tokens included."""

    enabled: bool = True
    min_words: int = Field(default=50, ge=0, le=1_000_000, description="fewer non-symbol words: too short")
    max_words: int = Field(default=100_000, ge=1, le=100_000_000, description="more non-symbol words: too long")
    min_mean_word_length: float = Field(default=3.0, ge=0.0, le=100.0)
    max_mean_word_length: float = Field(default=10.0, ge=0.0, le=1000.0)
    max_symbol_word_ratio: float = Field(default=0.1, ge=0.0, le=10.0, description="'#' (and, separately, ellipses) per word")
    max_bullet_lines_ratio: float = Field(default=0.9, ge=0.0, le=1.0, description="lines starting with a bullet")
    max_ellipsis_lines_ratio: float = Field(default=0.3, ge=0.0, le=1.0, description="lines ending with an ellipsis")
    min_alpha_words_ratio: float = Field(default=0.8, ge=0.0, le=1.0, description="words containing a letter / words")
    min_stop_words: int = Field(default=2, ge=0, le=100, description="distinct stop words the document must contain")
    stop_words: list[str] = Field(default=["the", "be", "to", "of", "and", "that", "have", "with"], min_length=1)


class C4Policy(Section):
    """C4 (Raffel et al. 2020) line rules; dropped lines are removed from the text later rules see."""

    enabled: bool = True
    remove_citations: bool = Field(default=True, description="strip [1], [edit], [citation needed]")
    filter_no_terminal_punct: bool = Field(default=False, description="drop lines not ending in . ? ! \" ' (FineWeb: off)")
    min_sentences: int = Field(default=5, ge=0, le=10_000, description="fewer sentences left after line removal: reject")
    min_words_per_line: int = Field(default=3, ge=0, le=1000, description="drop lines with fewer whitespace words")
    max_word_length: int = Field(default=1000, ge=1, le=1_000_000, description="drop lines with a longer word")
    lorem_ipsum: bool = Field(default=True, description="reject documents containing 'lorem ipsum'")
    javascript: bool = Field(default=True, description="drop lines mentioning javascript")
    curly_bracket: bool = Field(default=True, description="reject documents with a '{' (code)")
    policy_lines: bool = Field(default=True, description="drop cookie / terms-of-use / privacy-policy lines")


class FineWebPolicy(Section):
    """FineWeb's own line heuristics (Penedo et al. 2024), measured on the C4-cleaned text."""

    enabled: bool = True
    min_line_punct_ratio: float = Field(default=0.12, ge=0.0, le=1.0, description="lines ending in terminal punctuation")
    line_punct_exclude_zero: bool = Field(default=False, description="let documents with no such line through")
    max_short_line_ratio: float = Field(default=0.67, ge=0.0, le=1.0)
    short_line_length: int = Field(default=30, ge=0, le=10_000, description="a line this long or shorter is short")
    max_dup_line_char_ratio: float = Field(default=0.01, ge=0.0, le=1.0, description="chars in duplicated lines / chars")
    max_newline_word_ratio: float = Field(default=0.3, ge=0.0, le=100.0, description="newlines per word: list-like")


class LanguagePolicy(Section):
    """Offline language identification (py3langid, model inside the wheel)."""

    enabled: bool = True
    languages: list[str] = Field(default=["en"], min_length=1, description="ISO 639-1 codes to accept")
    min_score: float = Field(default=0.65, ge=0.0, le=1.0, description="lowest probability of the detected language")
    max_chars: int = Field(
        default=600,
        ge=50,
        le=10_000_000,
        description="classify only the first N characters "
        "(the model walks every byte through a 40 MB table; accuracy saturates long before this)",
    )
    trust_lang_field: bool = Field(
        default=False,
        description="a message's `lang` field (ISO 639, 'zh-CN' -> zh) replaces detection: it picks the profile "
        "and is checked against `languages` (score 1.0); messages without one are detected",
    )

    @field_validator("languages")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not re.fullmatch(r"[a-z]{2,3}", c)]
        if bad:
            raise ValueError(f"language codes must be lowercase ISO 639 codes, got {bad}")
        return v


class QualityPolicy(Section):
    language: LanguagePolicy = LanguagePolicy()
    gopher_repetition: GopherRepetitionPolicy = GopherRepetitionPolicy()
    gopher_quality: GopherQualityPolicy = GopherQualityPolicy()
    c4: C4Policy = C4Policy()
    fineweb: FineWebPolicy = FineWebPolicy()
    profiles: dict[str, LanguageProfile] = Field(
        default={},
        description="per-language overrides of the thresholds above, on top of the built-in profile "
        "(policies/language_profiles.py), e.g. {vi: {min_stop_words: 1}}",
    )

    @field_validator("profiles")
    @classmethod
    def _profile_codes(cls, v: dict[str, LanguageProfile]) -> dict[str, LanguageProfile]:
        for code in v:
            check_language_code(code)
        return v

    @model_validator(mode="after")
    def _profiles_consistent(self) -> QualityPolicy:
        for lang in sorted(set(self.profiles) | set(self.language.languages)):
            resolve_profile(self, lang)  # raises ValueError naming quality.profiles.<lang>
        return self


# Which quality section each LanguageProfile field overrides.
_SECTIONS: dict[str, type[Section]] = {
    "gopher_repetition": GopherRepetitionPolicy,
    "gopher_quality": GopherQualityPolicy,
    "c4": C4Policy,
    "fineweb": FineWebPolicy,
}
_SECTION_OF: dict[str, str] = {
    f: name for name, model in _SECTIONS.items() for f in model.model_fields if f in LanguageProfile.model_fields and f != "enabled"
}
assert set(_SECTION_OF) == set(LanguageProfile.model_fields) - {"segmentation"}, "every profile field must name one section field"


@dataclass(frozen=True)
class Profile:
    """The thresholds one language's documents are judged by (the sections with that language's overrides applied)."""

    lang: str | None
    segmentation: Segmentation
    gopher_repetition: GopherRepetitionPolicy
    gopher_quality: GopherQualityPolicy
    c4: C4Policy
    fineweb: FineWebPolicy


def resolve_profile(policy: QualityPolicy, lang: str | None) -> Profile:
    """Sections <- built-in profile of `lang` <- policy.profiles[lang]; None: the sections alone (English)."""
    builtin = BUILTIN_PROFILES.get(lang) if lang else None
    custom = policy.profiles.get(lang) if lang else None
    merged: dict[str, Any] = {}
    if lang and builtin is None and (custom is None or custom.stop_words is None):
        merged["min_stop_words"] = 0  # the sections' stop words are English: no stop-word rule without a list of its own
    for prof in (builtin, custom):
        if prof is not None:
            merged.update(prof.overrides())
    seg = merged.pop("segmentation", "whitespace")
    sections: dict[str, Any] = {}
    where = f"quality.profiles.{lang}" if lang else "quality"
    for name in _SECTIONS:
        base = getattr(policy, name)
        upd = {k: v for k, v in merged.items() if _SECTION_OF[k] == name}
        sections[name] = base.model_copy(update=upd) if upd else base
    q: GopherQualityPolicy = sections["gopher_quality"]
    if q.min_stop_words > len(set(q.stop_words)):
        raise ValueError(f"{where}: min_stop_words ({q.min_stop_words}) is more than the {len(set(q.stop_words))} distinct stop words")
    if q.min_mean_word_length > q.max_mean_word_length:
        raise ValueError(
            f"{where}: min_mean_word_length ({q.min_mean_word_length}) is above max_mean_word_length ({q.max_mean_word_length})"
        )
    if q.min_words > q.max_words:
        raise ValueError(f"{where}: min_words ({q.min_words}) is above max_words ({q.max_words})")
    return Profile(lang, seg, sections["gopher_repetition"], q, sections["c4"], sections["fineweb"])


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str | None = None
    text: str | None = None  # the C4-cleaned text of an accepted document (see module docstring)
    # Detected (or the trusted `lang` field) when the language rule ran: what a round mixes by, not part of the verdict.
    language: str | None = field(default=None, compare=False)


# --------------------------------------------------------------------------- words

# spaCy's English affix classes, as sets we test one character at a time.
_PUNCT = set(",:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪…")
_QUOTES = set("'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧")
_CURRENCY = set("$£€¥฿₽﷼₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₻₼₾₿")
_UNITS = tuple(
    sorted(
        (
            "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh "
            "mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %"
        ).split(),
        key=len,
        reverse=True,
    )
)
_PREFIX_ONLY = set("§%=—–")
_CONTRACTIONS = ("n't", "n’t", "'m", "’m", "'re", "’re", "'ve", "’ve", "'ll", "’ll", "'d", "’d")
_SPECIAL = {
    w: (w,)
    for w in (
        "e.g. i.e. vs. Mr. Mrs. Ms. Dr. Prof. Inc. Ltd. Co. Corp. Jr. Sr. St. Mt. a.m. p.m. Ph.D. U.S. U.K. "
        "Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. Gen. Gov. Rep. Sen. Rev. Bros. "
        "'em ma'am o'clock :) :-) :( :-( ;) :P :D (: <3 =) xD"
    ).split()
} | {f"{c}.": (f"{c}.",) for c in string.ascii_lowercase}
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|www\.)\S+$")
_LOWER, _UPPER = "a-zß-öø-ÿ", "A-ZÀ-ÖØ-Þ"
_Q = "'\"”“`‘´’‚,„»«"


@lru_cache(maxsize=1)
def _infix_re() -> re.Pattern[str]:
    icons = "".join(chr(c) for c in range(0x2000, 0x1FB00) if unicodedata.category(chr(c)) == "So")
    return re.compile(
        r"\.\.+|…|[" + re.escape(icons) + r"]"
        r"|(?<=[0-9])[+\-*^](?=[0-9-])"
        rf"|(?<=[{_LOWER}{_Q}])\.(?=[{_UPPER}{_Q}])"
        r"|(?<=[^\W\d_]),(?=[^\W\d_])"
        r"|(?<=[^\W_])(?:-|–|—|--|---|——|~)(?=[^\W\d_])"
        r"|(?<=[^\W_])[:<>=/](?=[^\W\d_])"
    )


def _is_icon(c: str) -> bool:
    return unicodedata.category(c) == "So"


def _prefix_len(s: str) -> int:
    c = s[0]
    if c in _PREFIX_ONLY or c in _PUNCT or c in _QUOTES or c in _CURRENCY or _is_icon(c):
        return 1
    if c == "+" and not s[1:2].isdigit():
        return 1
    if s.startswith(".."):
        return len(s) - len(s.lstrip("."))
    for cur in ("US$", "C$", "A$"):
        if s.startswith(cur):
            return len(cur)
    return 0


def _suffix_len(s: str) -> int:
    """Length of the leftmost-starting suffix spaCy's English rules would split off (0: none)."""
    n = len(s)
    starts = []
    c = s[-1]
    if c in _PUNCT or c in _QUOTES or c in "—–" or _is_icon(c):
        starts.append(n - 1)
    if n >= 2:
        if s.endswith(".."):
            starts.append(n - (n - len(s.rstrip("."))))
        if s[-2:] in ("'s", "'S", "’s", "’S"):
            starts.append(n - 2)
        p = s[-2]
        if c == "+" and p.isdigit():
            starts.append(n - 1)
        if c == "." and (p.isdigit() or p.islower() or p in "%²-+" or p in _PUNCT or p in _Q):
            starts.append(n - 1)
        if c == "." and n >= 3 and p.isupper() and s[-3].isupper():
            starts.append(n - 1)
        if c == "." and n >= 3 and s[-3] == "°" and p in "FfCcKk":
            starts.append(n - 1)
        if c in _CURRENCY and p.isdigit():
            starts.append(n - 1)
        for u in _UNITS:
            if s.endswith(u) and n > len(u) and s[-len(u) - 1].isdigit():
                starts.append(n - len(u))
                break
    return n - min(starts) if starts else 0


def _special(s: str) -> tuple[str, ...] | None:
    if s in _SPECIAL:
        return _SPECIAL[s]
    if not s.isupper():
        for c in _CONTRACTIONS:
            if s.endswith(c) and len(s) > len(c) and s[-len(c) - 1].isalpha():
                return (s[: -len(c)], s[-len(c) :])
    return None


def _split_chunk(s: str) -> list[str]:
    """One whitespace-free chunk -> tokens, following spaCy's affix algorithm."""
    prefixes: list[str] = []
    suffixes: list[str] = []
    special = _special(s)
    while s and special is None and not _URL.match(s):
        last = len(s)
        pre = _prefix_len(s)
        if pre:
            rest = s[pre:]
            if rest and _special(rest):
                prefixes.append(s[:pre])
                s = rest
                break
        suf = _suffix_len(s[pre:]) if s[pre:] else 0
        if suf:
            rest = s[:-suf]
            if rest and _special(rest):
                suffixes.append(s[-suf:])
                s = rest
                break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
        special = _special(s) if s else None
        if len(s) == last:
            break
    out = prefixes
    if s:
        special = special or _special(s)
        if special:
            out.extend(special)
        elif _URL.match(s):
            out.append(s)
        else:
            start = 0
            for m in _infix_re().finditer(s):
                a, b = m.start(), m.end()
                if a == 0:
                    continue
                if a != start:
                    out.append(s[start:a])
                if a != b:
                    out.append(s[a:b])
                start = b
            if s[start:]:
                out.append(s[start:])
    out.extend(reversed(suffixes))
    return out


# Flags per word id.
_F_ALPHA, _F_SYMBOL, _F_PUNCT, _F_SENT_END = 1, 2, 4, 8
_SYMBOL_CHARS = frozenset(
    string.punctuation
    + "—–‘’“”„«»…、。，：；！？（）【】「」《》〈〉━►´∶％～．１"
    + "".join(map(chr, [*range(0, 9), 11, 12, *range(13, 32), *range(127, 160)]))
)
# Sentence terminals of the common scripts (a line "ends in punctuation" with one of these).
_TERMINAL = ".!?։؟۔܀܁܂।॥။።፧፨᙮᠃᠉‼‽⁇⁈⁉。．｡！？"
_TERMINAL_T = tuple(_TERMINAL)
_MAX_VOCAB = 1 << 21
_MAX_MEMO = 1 << 20


@njit(cache=True)
def _expand(raw: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Chunk codes -> word ids: a code >= 0 is one word's id, -k-1 names multi-word chunk k."""
    n = 0
    for c in raw:
        n += 1 if c >= 0 else offsets[-c] - offsets[-c - 1]
    out = np.empty(n, np.int64)
    j = 0
    for c in raw:
        if c >= 0:
            out[j] = c
            j += 1
        else:
            for t in range(offsets[-c - 1], offsets[-c]):
                out[j] = flat[t]
                j += 1
    return out


class _Vocab:
    """Word strings -> dense ids with per-id flags and lengths; a memo of whitespace chunks -> ids.

    A chunk that is one word maps straight to its id; a chunk of several words
    (a word and its comma) maps to -k-1, k indexing `multi_offsets`/`multi_flat`,
    so a document becomes ids with one `fromiter` and one small kernel.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.generation = getattr(self, "generation", -1) + 1
        self.ids: dict[str, int] = {}
        self.lens = np.zeros(1 << 14, np.int64)
        self.flags = np.zeros(1 << 14, np.uint8)
        self.memo: dict[str, int] = {}
        self.multi_flat = np.zeros(1 << 14, np.int64)
        self.multi_offsets = np.zeros(1 << 12, np.int64)
        self.n_multi = 0

    def intern(self, w: str) -> int:
        i = self.ids.get(w)
        if i is None:
            i = len(self.ids)
            self.ids[w] = i
            if i >= len(self.lens):
                self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
                self.flags = np.concatenate([self.flags, np.zeros_like(self.flags)])
            self.lens[i] = len(w)
            f = 0
            if any(c.isalpha() for c in w):
                f |= _F_ALPHA
            if all(c in _SYMBOL_CHARS for c in w):
                f |= _F_SYMBOL
            if all(unicodedata.category(c).startswith("P") for c in w):
                f |= _F_PUNCT
            if w in _TERMINAL:
                f |= _F_SENT_END
            self.flags[i] = f
        return i

    def chunk(self, c: str) -> int:
        code = self.memo.get(c)
        if code is None:
            ids = [self.intern(w) for w in _split_chunk(c)]
            if len(ids) == 1:
                code = ids[0]
            else:
                k = self.n_multi
                start = int(self.multi_offsets[k])
                while k + 2 > len(self.multi_offsets):
                    self.multi_offsets = np.concatenate([self.multi_offsets, np.zeros_like(self.multi_offsets)])
                while start + len(ids) > len(self.multi_flat):
                    self.multi_flat = np.concatenate([self.multi_flat, np.zeros_like(self.multi_flat)])
                self.multi_flat[start : start + len(ids)] = ids
                self.multi_offsets[k + 1] = start + len(ids)
                self.n_multi = k + 1
                code = -k - 1
            self.memo[c] = code
        return code

    def words(self, text: str) -> np.ndarray:
        chunks = text.split()
        try:
            raw = np.fromiter(map(self.memo.__getitem__, chunks), np.int64, len(chunks))
        except KeyError:
            raw = np.fromiter(map(self.chunk, chunks), np.int64, len(chunks))
        return _expand(raw, self.multi_flat, self.multi_offsets)

    def count(self, text: str) -> int:
        return len(self.words(text))


_VOCAB = _Vocab()


# --------------------------------------------------------------------------- n-gram kernel


@njit(cache=True)
def _ngram_char_counts(ids: np.ndarray, lens: np.ndarray, out: np.ndarray) -> None:
    """out[0..2]: chars of the top 2/3/4-gram times its count; out[3..8]: chars in repeated 5..10-grams.

    Follows datatrove: the top n-gram is the first seen among the most frequent,
    its length counts the joining spaces; repeated n-grams are counted greedily
    left to right, skipping over a repeat (its words are not counted twice).
    """
    n = ids.shape[0]
    out[:] = 0
    if n < 2:
        return
    cum = np.zeros(n + 1, np.int64)
    for i in range(n):
        cum[i + 1] = cum[i] + lens[ids[i]]
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    keys = np.zeros(cap, np.uint64)
    used = np.zeros(cap, np.bool_)
    counts = np.zeros(cap, np.int64)
    first = np.zeros(cap, np.int64)
    slot_of = np.zeros(n, np.int64)
    h = np.zeros(n, np.uint64)
    for i in range(n):
        h[i] = np.uint64(ids[i]) * np.uint64(0x9E3779B97F4A7C15)
    for g in range(2, 11):
        m = n - g + 1
        if m <= 0:
            return
        for i in range(m):
            x = (h[i] ^ np.uint64(ids[i + g - 1])) * np.uint64(0xBF58476D1CE4E5B9)
            h[i] = x ^ (x >> np.uint64(31))
        used[:] = False
        if g <= 4:
            for i in range(m):
                s = np.int64(h[i] & np.uint64(mask))
                while used[s] and keys[s] != h[i]:
                    s = (s + 1) & mask
                if not used[s]:
                    used[s] = True
                    keys[s] = h[i]
                    counts[s] = 0
                    first[s] = i
                counts[s] += 1
                slot_of[i] = s
            best, best_len = 0, 0
            for i in range(m):
                s = slot_of[i]
                if first[s] == i and counts[s] > best:
                    best = counts[s]
                    best_len = cum[i + g] - cum[i] + g - 1
            out[g - 2] = best * best_len
        else:
            rep = 0
            i = 0
            while i < m:
                s = np.int64(h[i] & np.uint64(mask))
                while used[s] and keys[s] != h[i]:
                    s = (s + 1) & mask
                if used[s]:
                    rep += cum[i + g] - cum[i]
                    i += g
                else:
                    used[s] = True
                    keys[s] = h[i]
                    i += 1
            out[g - 2] = rep


@njit(cache=True)
def _word_counts(ids: np.ndarray, lens: np.ndarray, flags: np.ndarray, stop_ids: np.ndarray, out: np.ndarray) -> None:
    """out: words, non-symbol words, chars of non-symbol words, words with a letter, distinct stop words."""
    out[:] = 0
    seen = np.zeros(stop_ids.shape[0], np.bool_)
    for i in range(ids.shape[0]):
        w = ids[i]
        f = flags[w]
        out[0] += 1
        if not f & 2:
            out[1] += 1
            out[2] += lens[w]
        if f & 1:
            out[3] += 1
        for j in range(stop_ids.shape[0]):
            if stop_ids[j] == w:
                seen[j] = True
    out[4] = seen.sum()


# --------------------------------------------------------------------------- language


@njit(cache=True)
def _lang_scores(
    data: np.ndarray,
    nextmove: np.ndarray,
    rowbase: np.ndarray,
    output: np.ndarray,
    ptc: np.ndarray,
    pc: np.ndarray,
    counts: np.ndarray,
    touched: np.ndarray,
) -> np.ndarray:
    """Naive-Bayes class scores: sum over byte n-gram features of log1p(count) * log P(feature | class) + prior."""
    state = 0
    k = 0
    for b in data:
        state = nextmove[rowbase[state] + b]
        f = output[state]
        if f >= 0:
            if counts[f] == 0:
                touched[k] = f
                k += 1
            counts[f] += 1
    scores = pc.copy()
    for j in range(k):
        f = touched[j]
        w = np.float32(np.log1p(np.float32(counts[f])))
        counts[f] = 0
        for c in range(scores.shape[0]):
            scores[c] += w * ptc[f, c]
    return scores


class _LangId:
    """py3langid's naive-Bayes model, scored as its classify(norm_probs=True) scores."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        m = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.ptc = np.ascontiguousarray(m.nb_ptc, np.float32)
        self.pc = np.asarray(m.nb_pc, np.float32)
        self.classes = list(m.nb_classes)
        self.nextmove = np.frombuffer(m.tk_nextmove, dtype=np.uint32)
        self.rowbase = np.asarray(m.tk_row, np.int64) << 8
        self.output = np.asarray(m.tk_output, np.int32)
        first: dict[str, int] = {}
        self.alias = [(first.setdefault(c, i), i) for i, c in enumerate(self.classes) if first.get(c, i) != i]
        self.counts = np.zeros(self.ptc.shape[0], np.int32)
        self.touched = np.zeros(self.ptc.shape[0], np.int32)

    def classify(self, text: str) -> tuple[str, float]:
        if text.isupper():
            text = text.lower()
        data = np.frombuffer(unicodedata.normalize("NFC", text).encode("utf8", "surrogatepass"), np.uint8)
        scores = _lang_scores(data, self.nextmove, self.rowbase, self.output, self.ptc, self.pc, self.counts, self.touched)
        scores *= np.float32(1.0 / math.sqrt(len(data) or 1))
        scores = np.exp(scores - scores.max())
        scores /= scores.sum()
        for i, j in self.alias:
            scores[i] += scores[j]
            scores[j] = 0.0
        k = int(scores.argmax())
        return self.classes[k], float(scores[k])


@lru_cache(maxsize=1)
def _langid() -> _LangId:
    return _LangId()


# --------------------------------------------------------------------------- the document


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_C4_END = (".", "?", "!", '"', "'")


def _dup_counts(items: list[str]) -> tuple[int, int]:
    """(repeated items, chars in repeats): an item counts from its second occurrence on."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


@dataclass
class _C4Result:
    reason: str | None  # c4_lorem_ipsum / c4_curly_bracket, whichever line came first
    kept: list[str]
    dropped_words: int  # words (our tokens) in dropped lines, minus those citations removed


class Doc:
    """Per-document work shared by every rule, each piece computed on first use."""

    def __init__(self, text: str, lang_field: str | None = None, profile_of: Callable[[Doc], Profile] | None = None) -> None:
        self.text = text
        self.lang_field = lang_field
        self.memo: dict[Any, Any] = {}
        self._profile_of = profile_of

    @cached_property
    def profile(self) -> Profile:
        """The thresholds of this document's language (detected, or its trusted `lang` field)."""
        return self._profile_of(self) if self._profile_of is not None else _english_profile()

    @cached_property
    def segmentation(self) -> str:
        return self.profile.segmentation

    def words_of(self, text: str) -> np.ndarray:
        """Word ids of a piece of this document, segmented as its language is."""
        return _VOCAB.words(segment(text, self.segmentation))

    @cached_property
    def ids(self) -> np.ndarray:
        return self.words_of(self.text)

    @cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @cached_property
    def ngram_chars(self) -> np.ndarray:
        out = np.zeros(9, np.int64)
        _ngram_char_counts(self.ids, _VOCAB.lens, out)
        return out

    def word_counts(self, stop_ids: np.ndarray) -> np.ndarray:
        key = ("words", stop_ids.tobytes())
        if key not in self.memo:
            out = np.zeros(5, np.int64)
            _word_counts(self.ids, _VOCAB.lens, _VOCAB.flags, stop_ids, out)
            self.memo[key] = out
        return self.memo[key]

    @cached_property
    def para_dups(self) -> tuple[int, int, int]:
        # Gopher paragraphs are split on runs of 2+ newlines; str.split is several times faster than re.split.
        text = self.text.strip()
        paras = [x.lstrip("\n") for x in text.split("\n\n")] if "\n\n" in text else [text]
        paras = [x for x in paras if x] or [""]
        return (len(paras), *_dup_counts(paras))

    @cached_property
    def line_dups(self) -> tuple[int, int, int]:
        # Gopher lines are split on runs of newlines, keeping one empty piece at either end.
        text = self.text
        lines = [x for x in text.split("\n") if x]
        lines += [""] * (text.startswith("\n") + text.endswith("\n")) if text else [""]
        return (len(lines), *_dup_counts(lines))

    def c4(self, p: C4Policy) -> _C4Result:
        key = ("c4", id(p))
        if key not in self.memo:
            self.memo[key] = _c4_lines(self, p)
        return self.memo[key]

    @property
    def cleaned(self) -> str | None:
        """The text after C4 line removal, if a C4 rule has looked at this document."""
        for k, v in self.memo.items():
            if k[0] == "c4":
                return "\n".join(v.kept).strip()
        return None


def _c4_lines(doc: Doc, p: C4Policy) -> _C4Result:
    """One pass over the lines applying C4's line rules, in datatrove's order.

    Words are whitespace words, as in datatrove, except in languages segmented
    into characters, where a line's words are its segmented words.
    """
    seg = doc.segmentation
    chars = seg != "whitespace"
    low = doc.text.lower()
    check_lorem = p.lorem_ipsum and "lorem ipsum" in low
    check_js = p.javascript and "javascript" in low
    check_curly = p.curly_bracket and "{" in doc.text
    check_policy = p.policy_lines and any(x in low for x in _POLICY_PHRASES)
    check_cite = p.remove_citations and "[" in doc.text
    kept: list[str] = []
    dropped = 0
    for raw in doc.lines:
        line = raw.strip()
        words = segment(line, seg).split() if chars else line.split()
        drop = len(line) > p.max_word_length and any(len(w) > p.max_word_length for w in words)
        if not drop and check_cite and "[" in line:
            cleaned = _CITATION.sub("", line)
            if cleaned != line:
                dropped += len(doc.words_of(line)) - len(doc.words_of(cleaned))
                line = cleaned
                if chars:
                    words = segment(line, seg).split()
        if not drop and p.filter_no_terminal_punct:
            drop = not line.endswith(_C4_END) or line.endswith("...")
        if not drop:
            drop = len(words) < p.min_words_per_line
        if not drop and (check_lorem or check_js or check_policy or check_curly):
            ll = line.lower()
            if check_lorem and "lorem ipsum" in ll:
                return _C4Result("c4_lorem_ipsum", [], 0)
            drop = check_js and "javascript" in ll
            if not drop and check_curly and "{" in line:
                return _C4Result("c4_curly_bracket", [], 0)
            drop = drop or (check_policy and any(x in ll for x in _POLICY_PHRASES))
        if drop:
            dropped += len(doc.words_of(line)) if line else 0
        else:
            kept.append(line)
    return _C4Result(None, kept, dropped)


def _sentences(line: str, segmentation: str = "whitespace") -> int:
    """Sentences spaCy's sentencizer finds: a new one starts at a non-punctuation word after a terminal mark."""
    n, seen_end = 1, False
    ids = _VOCAB.words(segment(line, segmentation))
    flags = _VOCAB.flags  # after words(): interning may have grown the array
    for w in ids:
        f = flags[w]
        if seen_end and not f & _F_PUNCT and not f & _F_SENT_END:
            n += 1
            seen_end = False
        elif f & _F_SENT_END:
            seen_end = True
    return n


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Filter:
    """One rule: `fails(doc)` is True when the document breaks it, and `reason` says which rule that was."""

    reason: str
    fails: Callable[[Doc], bool]


class FilterChain(list[Filter]):
    """The rules in order, plus how a document's language profile is found (`judge` hands it to the Doc)."""

    def __init__(self, filters: list[Filter], profile_of: Callable[[Doc], Profile]) -> None:
        super().__init__(filters)
        self.profile_of = profile_of


def _stop_ids(words: list[str]) -> Callable[[], np.ndarray]:
    """The stop words' ids, re-interned whenever the vocabulary has started over."""
    cache: list[Any] = [-1, None]

    def get() -> np.ndarray:
        if cache[0] != _VOCAB.generation:
            cache[:] = [_VOCAB.generation, np.array([_VOCAB.intern(w) for w in words], np.int64)]
        return cache[1]

    return get


@lru_cache(maxsize=1)
def _english_profile() -> Profile:
    return resolve_profile(QualityPolicy(), None)


def _detector(p: LanguagePolicy) -> Callable[[Doc], tuple[str, float]]:
    """Doc -> (language, score): the trusted `lang` field when the policy says so and the message has one, else py3langid."""
    lid = _langid()

    def detect(d: Doc) -> tuple[str, float]:
        if "lang" not in d.memo:
            trusted = normalize_lang_field(d.lang_field) if p.trust_lang_field else None
            d.memo["lang"] = (trusted, 1.0) if trusted else lid.classify(d.text[: p.max_chars])
        return d.memo["lang"]

    return detect


def _language_filters(p: LanguagePolicy) -> list[Filter]:
    allowed = set(p.languages)
    unknown = allowed - set(_langid().classes)
    if unknown:
        raise ValueError(f"quality.language.languages: the model does not know {sorted(unknown)}")
    detect = _detector(p)
    return [
        Filter("language_not_allowed", lambda d: detect(d)[0] not in allowed),
        Filter("language_low_score", lambda d: detect(d)[1] < p.min_score),
    ]


def _repetition_filters(prof: Callable[[Doc], Profile]) -> list[Filter]:
    def frac_over(i: int, field: str) -> Callable[[Doc], bool]:
        return lambda d: d.ngram_chars[i] / len(d.text) > getattr(prof(d).gopher_repetition, field)

    def rep(d: Doc) -> GopherRepetitionPolicy:
        return prof(d).gopher_repetition

    out = [
        Filter("gopher_dup_para_frac", lambda d: d.para_dups[1] / d.para_dups[0] > rep(d).max_dup_para_frac),
        Filter("gopher_dup_para_char_frac", lambda d: d.para_dups[2] / len(d.text) > rep(d).max_dup_para_char_frac),
        Filter("gopher_dup_line_frac", lambda d: d.line_dups[1] / d.line_dups[0] > rep(d).max_dup_line_frac),
        Filter("gopher_dup_line_char_frac", lambda d: d.line_dups[2] / len(d.text) > rep(d).max_dup_line_char_frac),
    ]
    for n in range(2, 5):
        out.append(Filter(f"gopher_top_{n}_gram", frac_over(n - 2, f"max_top_{n}_gram_frac")))
    for n in range(5, 11):
        out.append(Filter(f"gopher_dup_{n}_gram", frac_over(n - 2, f"max_dup_{n}_gram_frac")))
    return out


def _quality_filters(prof: Callable[[Doc], Profile]) -> list[Filter]:
    stops: dict[tuple[str, ...], Callable[[], np.ndarray]] = {}

    def q(d: Doc) -> GopherQualityPolicy:
        return prof(d).gopher_quality

    def wc(d: Doc) -> np.ndarray:
        words = tuple(q(d).stop_words)
        get = stops.get(words)
        if get is None:
            get = stops[words] = _stop_ids(list(words))
        return d.word_counts(get())

    def mean_len(d: Doc) -> float:
        c = wc(d)
        return c[2] / c[1] if c[1] else math.nan

    def per_word(x: int, d: Doc) -> float:
        return x / wc(d)[0] if wc(d)[0] else 0.0

    def line_frac(pred: Callable[[str], bool], d: Doc) -> float:
        lines = d.lines
        return sum(map(pred, lines)) / len(lines) if lines else 0.0

    def bullet(s: str) -> bool:
        return s.lstrip().startswith(("•", "-"))

    def ellipsis(s: str) -> bool:
        return s.rstrip().endswith(("...", "…"))

    return [
        Filter("gopher_below_min_words", lambda d: wc(d)[1] < q(d).min_words),
        Filter("gopher_above_max_words", lambda d: wc(d)[1] > q(d).max_words),
        Filter("gopher_below_min_mean_word_length", lambda d: mean_len(d) < q(d).min_mean_word_length),
        Filter("gopher_above_max_mean_word_length", lambda d: mean_len(d) > q(d).max_mean_word_length),
        Filter("gopher_hash_ratio", lambda d: per_word(d.text.count("#"), d) > q(d).max_symbol_word_ratio),
        Filter("gopher_ellipsis_ratio", lambda d: per_word(d.text.count("...") + d.text.count("…"), d) > q(d).max_symbol_word_ratio),
        Filter("gopher_bullet_lines", lambda d: line_frac(bullet, d) > q(d).max_bullet_lines_ratio),
        Filter("gopher_ellipsis_lines", lambda d: line_frac(ellipsis, d) > q(d).max_ellipsis_lines_ratio),
        Filter("gopher_below_alpha_words", lambda d: per_word(wc(d)[3], d) < q(d).min_alpha_words_ratio),
        Filter("gopher_few_stop_words", lambda d: wc(d)[4] < q(d).min_stop_words),
    ]


def _c4_filters(prof: Callable[[Doc], Profile]) -> list[Filter]:
    def too_few_sentences(d: Doc) -> bool:
        p = prof(d).c4
        kept = d.c4(p).kept
        if len(kept) >= p.min_sentences:  # every kept line holds at least one sentence
            return False
        seg = d.segmentation
        return sum(_sentences(line, seg) for line in kept) < p.min_sentences

    return [
        Filter("c4_lorem_ipsum", lambda d: d.c4(prof(d).c4).reason == "c4_lorem_ipsum"),
        Filter("c4_curly_bracket", lambda d: d.c4(prof(d).c4).reason == "c4_curly_bracket"),
        Filter("c4_too_few_sentences", too_few_sentences),
    ]


@dataclass
class _FineWebView:
    lines: list[str]
    chars: int  # characters of the text without newlines
    newlines: int
    words: int


def _fineweb_filters(prof: Callable[[Doc], Profile], after_c4: bool) -> list[Filter]:
    def view(d: Doc) -> _FineWebView:
        if "fineweb" not in d.memo:
            if after_c4:
                r = d.c4(prof(d).c4)
                text = "\n".join(r.kept).strip()
                words = len(d.ids) - r.dropped_words
            else:
                text = d.text
                words = len(d.ids)
            lines = [ln for ln in text.split("\n") if ln.strip()]
            d.memo["fineweb"] = _FineWebView(lines, len(text) - text.count("\n"), text.count("\n"), words)
        return d.memo["fineweb"]

    def ratio(pred: Callable[[str], bool], d: Doc) -> float:
        lines = view(d).lines
        return sum(map(pred, lines)) / len(lines)

    def punct_fails(d: Doc) -> bool:
        p = prof(d).fineweb
        r = ratio(lambda s: s.endswith(_TERMINAL_T), d)
        return r < p.min_line_punct_ratio and not (r == 0 and p.line_punct_exclude_zero)

    def short_lines(d: Doc) -> bool:
        p = prof(d).fineweb
        return ratio(lambda s: len(s) <= p.short_line_length, d) > p.max_short_line_ratio

    def dup_chars(d: Doc) -> float:
        v = view(d)
        return _dup_counts(v.lines)[1] / v.chars if v.chars else 0.0

    def list_like(d: Doc) -> bool:
        v = view(d)
        return v.newlines / v.words > prof(d).fineweb.max_newline_word_ratio if v.words else v.newlines > 0

    return [
        Filter("empty_document", lambda d: not view(d).lines),
        Filter("fineweb_line_punct_ratio", punct_fails),
        Filter("fineweb_short_line_ratio", short_lines),
        Filter("fineweb_char_dup_ratio", lambda d: dup_chars(d) > prof(d).fineweb.max_dup_line_char_ratio),
        Filter("fineweb_list_ratio", list_like),
    ]


def _profile_resolver(policy: QualityPolicy) -> Callable[[Doc], Profile]:
    """Doc -> the profile of its language: detected (or trusted) when the language check is on, else its trusted
    `lang` field, else the sections alone (English)."""
    base = resolve_profile(policy, None)
    cache: dict[str | None, Profile] = {None: base}
    lp = policy.language
    detect = _detector(lp) if lp.enabled else None

    def lang_of(d: Doc) -> str | None:
        if detect is not None:
            return detect(d)[0]
        return normalize_lang_field(d.lang_field) if lp.trust_lang_field else None

    def profile_of(d: Doc) -> Profile:
        lang = lang_of(d)
        p = cache.get(lang)
        if p is None:
            p = cache[lang] = resolve_profile(policy, lang)
        return p

    return profile_of


def _profile(d: Doc) -> Profile:
    return d.profile


def build_filters(policy: QualityPolicy) -> FilterChain:
    """The enabled rules in the order they are tried (FineWeb's pipeline order, language first)."""
    filters = [Filter("empty_document", lambda d: not d.text)]
    if policy.language.enabled:
        filters += _language_filters(policy.language)
    if policy.gopher_repetition.enabled:
        filters += _repetition_filters(_profile)
    if policy.gopher_quality.enabled:
        filters += _quality_filters(_profile)
    if policy.c4.enabled:
        filters += _c4_filters(_profile)
    if policy.fineweb.enabled:
        filters += _fineweb_filters(_profile, policy.c4.enabled)
    return FilterChain(filters, _profile_resolver(policy))


def judge(text: str, filters: list[Filter], lang: str | None = None) -> Verdict:
    """First failing rule wins; an accepted document carries its C4-cleaned text when C4 ran.

    `lang` is the message's `lang` field; it is used only when `quality.language.trust_lang_field` is set.
    """
    if len(_VOCAB.ids) > _MAX_VOCAB or len(_VOCAB.memo) > _MAX_MEMO:
        _VOCAB.reset()
    doc = Doc(text, lang, getattr(filters, "profile_of", None))
    for f in filters:
        if f.fails(doc):
            return Verdict(False, f.reason, language=doc.memo.get("lang", (None,))[0])
    return Verdict(True, None, doc.cleaned, language=doc.memo.get("lang", (None,))[0])


def _all_reasons() -> tuple[str, ...]:
    rules = (
        [Filter("empty_document", bool)]
        + [Filter(r, bool) for r in ("language_not_allowed", "language_low_score")]
        + _repetition_filters(_profile)
        + _quality_filters(_profile)
        + _c4_filters(_profile)
        + _fineweb_filters(_profile, True)
    )
    return tuple(dict.fromkeys(f.reason for f in rules))


REASONS: tuple[str, ...] = _all_reasons()
