"""Words of a text: segmentation per script, spaCy-style splitting of what lies between spaces, word ids.

Segmentation (`segment`, a text -> text step in front of the whitespace split):

* `whitespace`: Latin, Cyrillic, Greek, Vietnamese, Arabic, Devanagari, Hangul ...
  Words are what lies between spaces, with punctuation split off by spaCy's
  English affix rules (`_split_chunk` below), which is what datatrove's
  per-language spaCy tokenizers do for these scripts too.
* `cjk_chars`: Chinese and Japanese. Every Han ideograph, kana and CJK
  punctuation mark becomes a word of its own; runs of other characters
  (Latin terms, numbers) stay words. `segment` puts a space around each such
  character, so the rest of the chain (word-id memo, numba kernels) is the
  same for every language.

Why characters and not a dictionary segmenter (jieba for Chinese, SudachiPy
for Japanese, as datatrove uses through spaCy): the filters only need word
*statistics* that separate prose from junk (counts, mean length, repeated
n-grams, stop words), not linguistically correct words, and a character
segmentation gives those with one regex substitution: 0.08 ms per document on
the handbook's Chinese and Japanese documents (1.7 KB), against 2.3 ms (1.3 ms
per KB) for `jieba.lcut` on one core of the dev box; jieba alone would take
more than the whole per-document budget of ingest (1,000 docs/s end to end).
The thresholds that depend on what a word is (minimum words, mean word length,
n-gram repetition, stop words, words per line) are set per language in
policies/language_profiles.py for character words. Thai (no spaces, alphabetic
script) would need a dictionary segmenter and has no built-in profile.

Word ids (why it is fast). datatrove splits words with spaCy's English
tokenizer. We split a text on whitespace (as spaCy does first) and look every
chunk up in a memo of chunk -> word ids (`VOCAB`); only unseen chunks go
through `_split_chunk`, our re-implementation of spaCy's prefix/suffix/infix
rules and its common special cases (contractions, abbreviations). Word
statistics then come from numpy arrays indexed by word id (length, flags:
has-a-letter, is-a-symbol, is-punctuation, ends-a-sentence). The memo and the
vocabulary are bounded and simply start over when full (`restart_if_full`).
The memo is process-global and not locked: use it from one thread per process.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from numba import njit

# Han (unified + extension A + compatibility), kana, CJK symbols and punctuation, half/full-width forms.
_CJK_RUN = re.compile("[\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]+")


def _spaced(m: re.Match[str]) -> str:
    return " " + " ".join(m.group()) + " "


def segment(text: str, segmentation: str) -> str:
    """The text with its words separated by whitespace (unchanged for `whitespace`).

    Runs of CJK characters are spaced out in one callback per run (7x faster than a callback per character).
    """
    if segmentation == "cjk_chars":
        return _CJK_RUN.sub(_spaced, text)
    return text


# spaCy's English affix classes, as sets we test one character at a time.
_PUNCT = set(",:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪…") | set("։؟۔܀܁܂।॥။።፧፨᙮᠃᠉‼‽⁇⁈⁉。．｡！？")
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
        if c == "." and (p.isdigit() or p.islower() or _caseless_letter(p) or p in "%²-+" or p in _PUNCT or p in _Q):
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


def _caseless_letter(c: str) -> bool:
    """A letter of a script without case (Hangul, Arabic, Hebrew, Devanagari, Thai ...) or a combining mark ending one.

    spaCy's English rule splits a full stop off a word only after a lowercase letter; in a script without case
    that never happens, "합니다." stayed one word and no sentence ever ended (C4 then rejected Korean prose).
    """
    return (c.isalpha() and not c.islower() and not c.isupper() and not c.istitle()) or unicodedata.category(c) in ("Mn", "Mc")


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
F_ALPHA, F_SYMBOL, F_PUNCT, F_SENT_END = 1, 2, 4, 8
_SYMBOL_CHARS = frozenset(
    string.punctuation
    + "—–‘’“”„«»…、。，：；！？（）【】「」《》〈〉━►´∶％～．１"
    + "".join(map(chr, [*range(0, 9), 11, 12, *range(13, 32), *range(127, 160)]))
)
# Sentence terminals of the common scripts: a word that is one of these ends a sentence, a line ending in one ends in punctuation.
TERMINAL_PUNCTUATION = ".!?։؟۔܀܁܂।॥။።፧፨᙮᠃᠉‼‽⁇⁈⁉。．｡！？"
_MARKS = ("Mn", "Mc")
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


class Vocabulary:
    """Word strings -> dense ids with per-id flags and lengths; a memo of whitespace chunks -> ids.

    A chunk that is one word maps straight to its id; a chunk of several words
    (a word and its comma) maps to -k-1, k indexing `multi_offsets`/`multi_flat`,
    so a text becomes ids with one `fromiter` and one small kernel.
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
        self._word_lists: dict[tuple[str, ...], np.ndarray] = {}

    def restart_if_full(self) -> None:
        """Start over when the vocabulary or the chunk memo has reached its bound (ids are not stable across this)."""
        if len(self.ids) > _MAX_VOCAB or len(self.memo) > _MAX_MEMO:
            self.reset()

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
            if any(c.isalpha() or unicodedata.category(c) in _MARKS for c in w):
                f |= F_ALPHA  # a letter, or a combining mark (a Devanagari vowel sign, an Arabic vowel): part of a word
            if all(c in _SYMBOL_CHARS for c in w):
                f |= F_SYMBOL
            if all(unicodedata.category(c).startswith("P") for c in w):
                f |= F_PUNCT
            if w in TERMINAL_PUNCTUATION:
                f |= F_SENT_END
            self.flags[i] = f
        return i

    def ids_of(self, words: Sequence[str]) -> np.ndarray:
        """The ids of a list of words (stop words), interned once per generation of the vocabulary."""
        key = tuple(words)
        out = self._word_lists.get(key)
        if out is None:
            out = self._word_lists[key] = np.array([self.intern(w) for w in key], np.int64)
        return out

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
        """Word ids of a text whose words are separated by whitespace (see `segment`)."""
        chunks = text.split()
        try:
            raw = np.fromiter(map(self.memo.__getitem__, chunks), np.int64, len(chunks))
        except KeyError:
            raw = np.fromiter(map(self.chunk, chunks), np.int64, len(chunks))
        return _expand(raw, self.multi_flat, self.multi_offsets)


VOCAB = Vocabulary()


def word_ids(text: str, segmentation: str) -> np.ndarray:
    """Word ids of a text segmented as its language is; `VOCAB.lens` and `VOCAB.flags` describe them."""
    return VOCAB.words(segment(text, segmentation))
