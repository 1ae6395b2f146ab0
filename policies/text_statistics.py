"""Per-document text statistics the quality rules measure: word counts, n-gram repetition, duplicate lines and paragraphs.

Each statistic has named fields (`WordCounts`, `NgramCounts`, `DuplicateCounts`)
and is computed once, on first use, on a `TextStatistics` that every rule of a
document shares, so a document rejected early pays only for what it used. The
definitions follow datatrove's Gopher filters (what a paragraph, a line, a top
or a duplicated n-gram is); the words are those of policies/word_segmentation.py.

Why numba. Top n-gram and duplicated n-gram character fractions run in one
kernel over the word-id array (rolling 64-bit n-gram hashes in an
open-addressing table), reproducing datatrove's greedy skip-ahead count; word
counts run in another. datatrove's joined-string n-grams make its chain run at
~50 docs/s, where ingest needs thousands.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import NamedTuple

import numpy as np
from numba import njit

from policies.word_segmentation import F_ALPHA, F_PUNCT, F_SENT_END, F_SYMBOL, VOCAB, word_ids


class WordCounts(NamedTuple):
    """Counts over a document's words (spaCy-style tokens, punctuation tokens included)."""

    words: int
    non_symbol_words: int  # words that are not all symbols: Gopher's word count
    non_symbol_chars: int  # characters of those words
    alpha_words: int  # words containing a letter
    stop_words: int  # distinct stop words the document contains

    @property
    def mean_word_length(self) -> float:
        """Mean length of the non-symbol words (NaN without any)."""
        return self.non_symbol_chars / self.non_symbol_words if self.non_symbol_words else math.nan

    @property
    def alpha_fraction(self) -> float:
        return self.per_word(self.alpha_words)

    def per_word(self, count: int) -> float:
        """`count` per word (0.0 for a document without words)."""
        return count / self.words if self.words else 0.0


class NgramCounts(NamedTuple):
    """Characters covered by the most frequent 2/3/4-gram (times its count, joining spaces included),
    and characters in repeated 5..10-grams (counted greedily left to right, as datatrove does)."""

    top_2: int
    top_3: int
    top_4: int
    dup_5: int
    dup_6: int
    dup_7: int
    dup_8: int
    dup_9: int
    dup_10: int


class DuplicateCounts(NamedTuple):
    """Items (lines or paragraphs), and those that repeat an earlier one, by count and by characters."""

    items: int
    duplicates: int
    duplicate_chars: int

    @property
    def fraction(self) -> float:
        return self.duplicates / self.items


def duplicates(items: list[str]) -> DuplicateCounts:
    """An item counts as a duplicate from its second occurrence on."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return DuplicateCounts(len(items), n, chars)


class TextStatistics:
    """The statistics of one text whose words are segmented as `segmentation` says, each computed on first use."""

    def __init__(self, text: str, segmentation: str) -> None:
        self.text = text
        self.chars = len(text)
        self.segmentation = segmentation

    def words_of(self, text: str) -> np.ndarray:
        """Word ids of a piece of this text (a line), segmented as the whole is."""
        return word_ids(text, self.segmentation)

    @cached_property
    def word_ids(self) -> np.ndarray:
        return self.words_of(self.text)

    @cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @cached_property
    def ngrams(self) -> NgramCounts:
        out = np.zeros(9, np.int64)
        _ngram_char_counts(self.word_ids, VOCAB.lens, out)
        return NgramCounts(*out.tolist())

    def word_counts(self, stop_words: Sequence[str]) -> WordCounts:
        stop_ids = VOCAB.ids_of(stop_words)  # interned before the text's own words, as they always were
        out = np.zeros(5, np.int64)
        _word_counts(self.word_ids, VOCAB.lens, VOCAB.flags, stop_ids, out)
        return WordCounts(*out.tolist())

    @cached_property
    def paragraph_duplicates(self) -> DuplicateCounts:
        # Gopher paragraphs are split on runs of 2+ newlines; str.split is several times faster than re.split.
        text = self.text.strip()
        paras = [x.lstrip("\n") for x in text.split("\n\n")] if "\n\n" in text else [text]
        return duplicates([x for x in paras if x] or [""])

    @cached_property
    def line_duplicates(self) -> DuplicateCounts:
        # Gopher lines are split on runs of newlines, keeping one empty piece at either end.
        text = self.text
        lines = [x for x in text.split("\n") if x]
        lines += [""] * (text.startswith("\n") + text.endswith("\n")) if text else [""]
        return duplicates(lines)


def sentence_count(line: str, segmentation: str = "whitespace") -> int:
    """Sentences spaCy's sentencizer finds: a new one starts at a non-punctuation word after a terminal mark."""
    n, seen_end = 1, False
    ids = word_ids(line, segmentation)
    flags = VOCAB.flags  # after word_ids(): interning may have grown the array
    for w in ids:
        f = flags[w]
        if seen_end and not f & F_PUNCT and not f & F_SENT_END:
            n += 1
            seen_end = False
        elif f & F_SENT_END:
            seen_end = True
    return n


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
        if not f & F_SYMBOL:
            out[1] += 1
            out[2] += lens[w]
        if f & F_ALPHA:
            out[3] += 1
        for j in range(stop_ids.shape[0]):
            if stop_ids[j] == w:
                seen[j] = True
    out[4] = seen.sum()
