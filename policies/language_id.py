"""Offline language identification: py3langid's naive-Bayes model, its byte-level feature walk done in numba.

The model ships inside py3langid's wheel; nothing is downloaded. py3langid's
own walk is a Python loop over every byte (~3 ms per 4 KB document); this one
gives the same scores as its `classify(norm_probs=True)`. The words of a document
are classified, not the code it cites (`prose_for_language_id`, on a second look); how many
characters, and what a score must reach, is the language rule's business
(policies/quality.py, `quality.language`): the model's 57 MB weight
table is read at random, one row per distinct byte n-gram, so cost grows with
the sample.
"""

from __future__ import annotations

import math
import re
import unicodedata
from functools import lru_cache

import numpy as np
from numba import njit


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


class LangIdClassifier:
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
        """(ISO 639-1 code, probability) of the most probable language of `text`."""
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


# A token of printable ASCII that looks like code rather than a word of any language: an option (-b, --base-dir),
# a path or URL, an assignment, `quoted`, a file name or version (apt.conf, 1.19.5), a snake_case or CamelCase
# identifier, a call or man page reference (foo(), adduser(8)), an ALLCAPS name, a number.
_CODE_TOKEN = re.compile(
    r"[/\\=`_<>{}$|@~*#\d]|--|\w\(|[a-z][A-Z]|[A-Za-z]\.[A-Za-z]"
    r"|^[(\"'\[]*-"
    r"|^[(\"'\[]*[A-Z][A-Z]+[)\"'\].,:;!?]*$"
)


def prose_for_language_id(text: str, max_chars: int) -> str:
    """The first `max_chars` characters of `text`'s words once code-like tokens (`_CODE_TOKEN`) are removed.

    Why: technical prose cites commands, options, paths and identifiers, which are the same English-looking
    ASCII in every language; py3langid scores them as English or as noise, and a French paragraph on
    `apt-get --no-install-recommends` can come out as not French. Words of the language, accented or not, stay
    (a token with a non-ASCII character is never code here). Twice the characters are read so that what is
    removed is replaced. ~0.2 ms per call, so the language rule asks for it only when a first look rejected the
    text as English or with a low score.
    """
    words = text[: 2 * max_chars].split()
    return " ".join(w for w in words if not (w.isascii() and _CODE_TOKEN.search(w)))[:max_chars]


@lru_cache(maxsize=1)
def langid_classifier() -> LangIdClassifier:
    """The one classifier of this process (loading the model takes a while and ~60 MB)."""
    return LangIdClassifier()
