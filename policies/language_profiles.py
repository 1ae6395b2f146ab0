"""Per-language filter profiles: how words are segmented, which stop words, which thresholds.

A profile only says where a language differs from the quality sections of the
policy file (`gopher_quality`, `gopher_repetition`, `c4`, `fineweb`, whose
defaults are datatrove's English ones). The thresholds a document is judged by
are, from weakest to strongest: the quality sections, the built-in profile of
its language (`BUILTIN_PROFILES`), the policy's `quality.profiles.<lang>`.
English has an empty built-in profile, so English verdicts are those of the
sections alone. A language with neither a built-in nor a policy profile is
judged by the generic profile of its script (`GENERIC_PROFILES`, `SCRIPT_OF`):
the sections with whitespace words (character words for Han), without the
stop-word rule (the sections' stop words are English), with word-length and
alphabetic-word bounds of the script; `cptd validate-policy` warns about each
such language, and `cptd calibrate-language` derives a profile of its own.

The reference is FineWeb-2 (datatrove's multilingual word tokenizers and its
per-language Gopher thresholds). Values here were chosen from the
distributions of the statistics on translated prose (the Debian handbook, see
daemon/dev/multilingual_corpus.py) so that clean prose sits well inside them;
docs/ingest.md gives the figures. Stop words are the 20-30 most frequent words
of each language (for Chinese and Japanese: characters and particles, since
those languages are segmented into characters).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from policies.base import Section

Segmentation = Literal["whitespace", "cjk_chars"]


class LanguageProfile(Section):
    """Overrides for one language; a field left out keeps the built-in profile's (or the section's) value."""

    segmentation: Segmentation | None = Field(
        default=None, description="whitespace: words between spaces; cjk_chars: every Han/kana character is a word"
    )
    stop_words: list[str] | None = Field(default=None, min_length=1, description="frequent words, matched exactly")
    min_stop_words: int | None = Field(default=None, ge=0, le=100, description="distinct stop words a document must contain")
    min_words: int | None = Field(default=None, ge=0, le=1_000_000)
    max_words: int | None = Field(default=None, ge=1, le=100_000_000)
    min_mean_word_length: float | None = Field(default=None, ge=0.0, le=100.0)
    max_mean_word_length: float | None = Field(default=None, ge=0.0, le=1000.0)
    max_symbol_word_ratio: float | None = Field(default=None, ge=0.0, le=10.0)
    max_bullet_lines_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    max_ellipsis_lines_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    min_alpha_words_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    max_top_2_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_top_3_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_top_4_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_dup_5_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_dup_6_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_dup_7_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_dup_8_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_dup_9_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    max_dup_10_gram_frac: float | None = Field(default=None, ge=0.0, le=1.0)
    min_sentences: int | None = Field(default=None, ge=0, le=10_000)
    min_words_per_line: int | None = Field(default=None, ge=0, le=1000)
    min_line_punct_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    max_short_line_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    short_line_length: int | None = Field(default=None, ge=0, le=10_000)
    max_newline_word_ratio: float | None = Field(default=None, ge=0.0, le=100.0)

    @field_validator("stop_words")
    @classmethod
    def _no_blank_stop_words(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not w or w != w.strip() or len(w.split()) != 1 for w in v):
            raise ValueError("stop words must be single words without spaces")
        return v

    @model_validator(mode="after")
    def _reachable(self) -> LanguageProfile:
        if self.stop_words is not None and self.min_stop_words is not None and self.min_stop_words > len(set(self.stop_words)):
            raise ValueError(
                f"min_stop_words ({self.min_stop_words}) is more than the {len(set(self.stop_words))} distinct stop words given"
            )
        return self

    def overrides(self) -> dict[str, Any]:
        """The fields this profile sets."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def check_language_code(code: str) -> str:
    if not re.fullmatch(r"[a-z]{2,3}", code):
        raise ValueError(f"language codes must be lowercase ISO 639 codes, got {code!r}")
    return code


def normalize_lang_field(value: str | None) -> str | None:
    """A message's `lang` field ("zh-CN", "pt_BR", "EN") -> its ISO 639 code, or None if it is not one."""
    if not value:
        return None
    code = value.strip().lower().replace("_", "-").split("-")[0]
    return code if re.fullmatch(r"[a-z]{2,3}", code) else None


# Stop words: the most frequent words of each language's running text.
_STOP = {
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus er hat dass sie nach",
    "fr": "de la le et les des en un du une que est pour qui dans par plus pas au sur ne se ce il sont avec ou son aux mais",
    "es": "de la que el en y a los del se las por un para con no una su al lo como más pero sus le ya o este es entre",
    "ru": "и в во не что он на я с со как а то все она так его но да ты к у же вы за бы по только ее мне было это для из или при от",
    "vi": "và của là các có được trong cho một những với không này để người đã khi từ thì như bạn sẽ cũng theo đó nó ra vào trên nhiều",
    "ar": "في من على إلى أن عن مع هذا هذه التي الذي ما لا أو كان هو هي كل بين قد ذلك عند إذا ثم لم بعد حتى كما أي",
    "hi": "के का की है में और को से एक पर यह भी हैं था कि लिए नहीं तो ने हो जो कर इस गया या थे किया रहा वह अपने",
    "zh": "的 是 在 了 不 和 有 这 一 个 中 为 以 也 上 们 到 要 可 会 对 就 与 其 而 或 从 被 将 所",
    "ja": "の に は を た が で て と し れ さ も な い か す ま る こ だ ら あ う",
}

# What Chinese and Japanese share: one word per character, so shorter words and more of them per line.
_CJK: dict = {
    "segmentation": "cjk_chars",
    "min_stop_words": 4,
    "min_words": 100,
    "min_mean_word_length": 0.9,
    "max_mean_word_length": 3.0,
    "min_words_per_line": 10,
    "short_line_length": 10,
}

BUILTIN_PROFILES: dict[str, LanguageProfile] = {
    # English: the quality sections as they are (datatrove's defaults, spaCy-style words, its 8 stop words).
    "en": LanguageProfile(),
    # Latin and Cyrillic alphabets: the English thresholds hold, except that German compounds make words longer,
    # and German and Russian set off every subordinate clause with a comma: more punctuation tokens per word
    # (5th percentile of words-with-a-letter on the handbook: en 0.80, de 0.77, ru 0.75).
    "de": LanguageProfile(stop_words=_STOP["de"].split(), max_mean_word_length=12.0, min_alpha_words_ratio=0.7),
    "fr": LanguageProfile(stop_words=_STOP["fr"].split()),
    "es": LanguageProfile(stop_words=_STOP["es"].split()),
    "ru": LanguageProfile(stop_words=_STOP["ru"].split(), max_mean_word_length=12.0, min_alpha_words_ratio=0.7),
    # Vietnamese writes one syllable per space-separated unit: short "words".
    "vi": LanguageProfile(stop_words=_STOP["vi"].split(), min_mean_word_length=2.0, max_mean_word_length=8.0),
    # Arabic clitics (wa-, al-, bi-) attach to words; sentences run long, joined by commas (،), so fewer full stops.
    "ar": LanguageProfile(
        stop_words=_STOP["ar"].split(), min_mean_word_length=2.5, max_mean_word_length=12.0, min_alpha_words_ratio=0.7, min_sentences=3
    ),
    # Devanagari vowel signs are characters of their own; words are otherwise English-like in length.
    "hi": LanguageProfile(stop_words=_STOP["hi"].split(), min_mean_word_length=2.0),
    # Chinese and Japanese: no spaces between words, each character is a word (see word_segmentation.py).
    "zh": LanguageProfile(stop_words=_STOP["zh"].split(), **_CJK),
    # Japanese inflections (される, しています, することが) repeat the same kana runs: character n-grams repeat
    # more than in Chinese (median duplicated 5-grams 16% of characters on the handbook, 99th percentile 32%).
    "ja": LanguageProfile(
        stop_words=_STOP["ja"].split(),
        **_CJK,
        max_top_4_gram_frac=0.2,
        max_dup_5_gram_frac=0.34,
        max_dup_6_gram_frac=0.30,
        max_dup_7_gram_frac=0.26,
        max_dup_8_gram_frac=0.23,
        max_dup_9_gram_frac=0.21,
        max_dup_10_gram_frac=0.20,
    ),
}


# --------------------------------------------------------------------------- generic profiles, by script

# The script each language py3langid knows is written in (Latin unless listed). A language without a profile of
# its own is judged by its script's generic profile, so `languages: [ko]` does not fall back to English rules.
_SCRIPT_LANGS = {
    "cyrillic": "ba be bg kk ky mk mn ru sr tg tt uk",
    "greek": "el grc",
    "armenian": "hy",
    "georgian": "ka",
    "arabic": "ar ary arz fa ps sdh ug ur",
    "hebrew": "he hbo",
    "brahmic": "as bn gom gu hi kn ml mr ne or pa sa si ta te",
    "hangul": "ko",
    "han": "zh wuu yue ja",
    "ethiopic": "am",
    "southeast_asian": "th lo km my dz",
}
SCRIPT_OF: dict[str, str] = {lang: script for script, langs in _SCRIPT_LANGS.items() for lang in langs.split()}

GENERIC_PROFILES: dict[str, LanguageProfile] = {
    # English rules, without the stop-word rule (the sections' stop words are English).
    "latin": LanguageProfile(min_stop_words=0),
    # Inflected alphabets that set off clauses with commas (like ru): more punctuation tokens per word, longer words.
    "cyrillic": LanguageProfile(min_stop_words=0, max_mean_word_length=12.0, min_alpha_words_ratio=0.7),
    "greek": LanguageProfile(min_stop_words=0, max_mean_word_length=12.0, min_alpha_words_ratio=0.7),
    "armenian": LanguageProfile(min_stop_words=0, max_mean_word_length=12.0, min_alpha_words_ratio=0.7),
    "georgian": LanguageProfile(min_stop_words=0, max_mean_word_length=14.0, min_alpha_words_ratio=0.7),
    # Abjads: clitics attach to words, short vowels are not written; sentences run long (as the ar profile).
    "arabic": LanguageProfile(
        min_stop_words=0, min_mean_word_length=2.5, max_mean_word_length=12.0, min_alpha_words_ratio=0.7, min_sentences=3
    ),
    "hebrew": LanguageProfile(
        min_stop_words=0, min_mean_word_length=2.5, max_mean_word_length=12.0, min_alpha_words_ratio=0.7, min_sentences=3
    ),
    # Devanagari and its relatives: vowel signs are characters of their own (as the hi profile).
    "brahmic": LanguageProfile(min_stop_words=0, min_mean_word_length=2.0, max_mean_word_length=14.0, min_alpha_words_ratio=0.7),
    # Korean: a space-separated word (eojeol) is a stem with its particles, written in 2-4 syllable blocks.
    "hangul": LanguageProfile(min_stop_words=0, min_mean_word_length=1.5, max_mean_word_length=8.0, min_alpha_words_ratio=0.7),
    # Han characters without a profile of their own (Cantonese, Wu): one word per character, as zh.
    "han": LanguageProfile(**{**_CJK, "min_stop_words": 0}),
    "ethiopic": LanguageProfile(min_stop_words=0, min_mean_word_length=2.0, min_alpha_words_ratio=0.7, min_sentences=3),
    # No spaces between words (Thai, Lao, Khmer, Burmese, Tibetan) and no dictionary segmenter here: the whitespace
    # "words" are phrases, so only the length bounds are opened; calibrate a profile on real text (calibrate-language).
    "southeast_asian": LanguageProfile(
        min_stop_words=0, min_words=10, max_mean_word_length=100.0, min_alpha_words_ratio=0.5, min_words_per_line=1, min_sentences=1
    ),
}
assert set(GENERIC_PROFILES) == {"latin", *_SCRIPT_LANGS}


def generic_profile(lang: str) -> tuple[str, LanguageProfile]:
    """(script, profile) a language without a profile of its own is judged by."""
    script = SCRIPT_OF.get(lang, "latin")
    return script, GENERIC_PROFILES[script]
