"""Word segmentation per script, as a text -> text step in front of the filters' whitespace word splitter.

* `whitespace`: Latin, Cyrillic, Greek, Vietnamese, Arabic, Devanagari, Hangul ...
  Words are what lies between spaces, with punctuation split off by the
  spaCy-style affix rules of policies/quality.py (`_split_chunk`), which is
  what datatrove's per-language spaCy tokenizers do for these scripts too.
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
"""

from __future__ import annotations

import re

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
