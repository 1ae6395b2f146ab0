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
segmentation gives those with one regex substitution, while jieba costs about
a millisecond per kilobyte of Chinese on one core (measured in docs/ingest.md),
which alone would exceed the 1 ms per document ingest can spend on filters.
The thresholds that depend on what a word is (minimum words, mean word length,
n-gram repetition, stop words, words per line) are set per language in
policies/language_profiles.py for character words. Thai (no spaces, alphabetic
script) would need a dictionary segmenter and has no built-in profile.
"""

from __future__ import annotations

import re

# Han (unified + extension A + compatibility), kana, CJK symbols and punctuation, half/full-width forms.
_CJK_CHAR = re.compile("([\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])")


def segment(text: str, segmentation: str) -> str:
    """The text with its words separated by whitespace (unchanged for `whitespace`)."""
    if segmentation == "cjk_chars":
        return _CJK_CHAR.sub(r" \1 ", text)
    return text
