"""The named counts the quality rules read (policies/text_statistics.py), the words under them
(policies/word_segmentation.py) and the language identifier (policies/language_id.py), on texts small
enough to count by hand."""

from __future__ import annotations

import math

from policies.language_id import langid_classifier
from policies.text_statistics import DuplicateCounts, NgramCounts, TextStatistics, WordCounts, duplicates, sentence_count
from policies.word_segmentation import VOCAB, segment, word_ids


def test_words_split_punctuation_off_and_cjk_text_into_characters() -> None:
    assert len(word_ids("The cat, the hat.", "whitespace")) == 6  # The cat , the hat .
    assert len(word_ids("Don't stop, Mr. Smith!", "whitespace")) == 7  # Do n't stop , Mr. Smith !
    assert segment("中文 text", "cjk_chars").split() == ["中", "文", "text"]
    assert len(word_ids("中文 text", "cjk_chars")) == 3


def test_word_counts_have_names() -> None:
    wc = TextStatistics("The cat, the hat.", "whitespace").word_counts(["the", "of"])
    assert wc == WordCounts(words=6, non_symbol_words=4, non_symbol_chars=12, alpha_words=4, stop_words=1)
    assert wc.mean_word_length == 3.0
    assert wc.alpha_fraction == 4 / 6
    assert wc.per_word(3) == 0.5
    empty = TextStatistics("", "whitespace").word_counts(["the"])
    assert empty == WordCounts(0, 0, 0, 0, 0)
    assert math.isnan(empty.mean_word_length) and empty.alpha_fraction == 0.0


def test_duplicate_paragraphs_and_lines_count_from_the_second_occurrence() -> None:
    assert duplicates(["a", "bb", "a", "a"]) == DuplicateCounts(items=4, duplicates=2, duplicate_chars=2)
    s = TextStatistics("Hello, world.\n\n\nHello, world.\nBye.\n", "whitespace")
    assert s.paragraph_duplicates == DuplicateCounts(items=2, duplicates=0, duplicate_chars=0)  # "Hello, world.\nBye." differs
    assert s.line_duplicates == DuplicateCounts(items=4, duplicates=1, duplicate_chars=13)  # one empty piece at the end
    assert s.line_duplicates.fraction == 0.25
    assert s.chars == len(s.text)


def test_ngram_counts_are_characters_covered() -> None:
    s = TextStatistics("a b a b a b", "whitespace")
    # top 2-gram "a b" (3 chars with its space) 3 times; the top 3-gram "a b a" (5 chars) 2 times.
    assert s.ngrams.top_2 == 9 and s.ngrams.top_3 == 10
    assert s.ngrams == NgramCounts(9, 10, 14, 0, 0, 0, 0, 0, 0)


def test_sentences_and_the_memo_restart() -> None:
    assert sentence_count("One. Two! three? (four)") == 4
    assert sentence_count('He said "Stop." Then he left') == 2  # the closing quote belongs to the first sentence
    before = TextStatistics("One two. One two.", "whitespace").ngrams
    VOCAB.reset()
    assert TextStatistics("One two. One two.", "whitespace").ngrams == before


def test_language_id_names_the_language_and_a_probability() -> None:
    lang, score = langid_classifier().classify("Der Hund läuft schnell über die Straße und bellt die Katze an.")
    assert lang == "de" and 0.5 < score <= 1.0
    assert langid_classifier().classify("The dog runs quickly across the street and barks at the cat.")[0] == "en"
