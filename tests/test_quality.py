"""Quality filters: every reason code has a document that triggers it, thresholds come from the policy."""

from __future__ import annotations

import random
import re

import pytest
from pydantic import ValidationError

from daemon.dev.sample_corpus import english_docs
from policies.config import PolicyError, parse_policy
from policies.quality import REASONS, QualityPolicy, Verdict, build_filters, judge

NO_LANG = {"language": {"enabled": False}}
GERMAN = (
    "Die Stadt hat heute beschlossen, die alte Brücke über den Fluss im nächsten Sommer zu erneuern. "
    "Nach Angaben der Verwaltung werden die Arbeiten etwa acht Monate dauern und der Verkehr wird "
    "während dieser Zeit über eine Umleitung geführt. Viele Anwohner begrüßen die Entscheidung, "
    "weil die Brücke seit Jahren in einem schlechten Zustand ist und immer wieder gesperrt werden musste. "
    "Die Kosten werden zum größten Teil vom Land getragen, den Rest übernimmt die Gemeinde selbst. "
    "Mit dem Beginn der Arbeiten wird im frühen Frühjahr gerechnet, sobald das Wetter es erlaubt."
)


def _policy(**sections: dict) -> QualityPolicy:
    data = {"language": {"enabled": False}}
    data.update(sections)
    return QualityPolicy.model_validate(data)


def _judge(text: str, policy: QualityPolicy | None = None) -> Verdict:
    return judge(text, build_filters(policy or _policy()))


@pytest.fixture(scope="module")
def good() -> str:
    return english_docs(1, target_bytes=4096, seed=11)[0]


def _sentences(good: str) -> list[str]:
    """Plain sentences of the good document: one line each, ending in a period after a letter or digit."""
    out = []
    for line in good.splitlines():
        for s in re.split(r"(?<=[a-z])\.\s", line):
            s = s.strip().rstrip(".")
            if len(s.split()) >= 6 and s[-1].isalnum():
                out.append(s + ".")
    return out


def _only(family: str, keep: str) -> QualityPolicy:
    """All of a family's repetition limits relaxed to 1.0 except `keep`, so one n-gram rule can be tested alone."""
    fields = QualityPolicy().gopher_repetition.model_dump()
    relaxed = {k: (v if k == keep else 1.0) for k, v in fields.items() if k.startswith("max_")}
    return _policy(**{family: relaxed})


def _with_phrase(good: str, phrase: str, every: int) -> str:
    words = good.split()
    out = []
    for i, w in enumerate(words):
        out.append(w)
        if i % every == every - 1:
            out.append(phrase)
    return " ".join(out)


def _crafted(good: str) -> dict[str, tuple[str, QualityPolicy | None]]:
    rng = random.Random(5)
    sents = _sentences(good)
    paras = [" ".join(sents[i : i + 3]) for i in range(0, len(sents), 3)]
    lines = sents
    short_words = "a an is it to be of in on at by we he so do go up or as no me my us the and".split()
    long_words = ["".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(7)) for _ in range(120)]
    no_stop = " ".join(w for w in good.split() if w.lower() not in {"the", "be", "to", "of", "and", "that", "have", "with"})
    numbers = " ".join(f"{w} {rng.randint(0, 10**6)}" for w in good.split())
    plain = [w for w in good.split() if w.isalpha()]
    by_length = sorted(sents, key=len, reverse=True)
    cases: dict[str, tuple[str, QualityPolicy | None]] = {
        "empty_document": ("", None),
        "language_not_allowed": (GERMAN, _policy(language={"enabled": True})),
        "language_low_score": ("Die Stadt the city und and", _policy(language={"enabled": True})),
        "gopher_dup_para_frac": ("\n\n".join(paras + [paras[0]] * (len(paras) // 2)), None),
        "gopher_dup_para_char_frac": ("\n\n".join(paras + [" ".join(paras[:3])] * 3), None),
        "gopher_dup_line_frac": ("\n".join(lines + [lines[0]] * (len(lines) // 2)), None),
        "gopher_dup_line_char_frac": ("\n".join(lines + [" ".join(lines[:6])] * 3), None),
        "gopher_below_min_words": (" ".join(good.split()[:45]), None),
        "gopher_above_max_words": (good, _policy(gopher_quality={"max_words": 100})),
        "gopher_below_min_mean_word_length": (" ".join(rng.choice(short_words) for _ in range(150)) + ".", None),
        "gopher_above_max_mean_word_length": (" ".join(long_words) + ". It is the end of it and the rest.", None),
        "gopher_hash_ratio": (_with_phrase(good, "#", 4), None),
        "gopher_ellipsis_ratio": (_with_phrase(good, "...", 4), None),
        "gopher_bullet_lines": ("\n".join("- " + s for s in lines), None),
        "gopher_ellipsis_lines": ("\n".join(s[:-1] + "..." for s in lines), None),
        "gopher_below_alpha_words": (numbers, None),
        "gopher_few_stop_words": (no_stop, None),
        "c4_lorem_ipsum": (good + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", None),
        "c4_curly_bracket": (good + "\nif (ready) { start(); } else { wait(); }", None),
        "c4_too_few_sentences": (
            "\n".join(s[:-1].replace(".", ";") + "." for s in by_length[:4])
            + "\nPlease enable JavaScript to see the comments.\nMenu\nHome",
            None,
        ),
        "fineweb_line_punct_ratio": ("\n".join(s.rstrip(".") for s in lines), None),
        "fineweb_short_line_ratio": ("\n".join(" ".join(plain[i : i + 4]) + ("." if i % 40 else "") for i in range(0, 600, 4)), None),
        "fineweb_char_dup_ratio": (good + "\n" + good.split("\n")[1], None),
        "fineweb_list_ratio": (
            "\n".join(" ".join(plain[i : i + 3]) + ("." if i % 15 == 0 else "") for i in range(0, 600, 3)),
            _policy(fineweb={"max_short_line_ratio": 1.0}),
        ),
    }
    for n in (2, 3, 4):
        cases[f"gopher_top_{n}_gram"] = (
            _with_phrase(good, " ".join(["repeatedly"] * n), 4),
            _only("gopher_repetition", f"max_top_{n}_gram_frac"),
        )
    for n in range(5, 11):
        phrase = "this phrase is said over and over again in the text here"
        cases[f"gopher_dup_{n}_gram"] = (
            good + "\n" + "\n".join([phrase + f" {i}." for i in range(40)]),
            _only("gopher_repetition", f"max_dup_{n}_gram_frac"),
        )
    return cases


def test_good_document_passes_everything(good: str) -> None:
    v = judge(good, build_filters(QualityPolicy()))
    assert v == Verdict(True, None, v.text)
    assert v.text and v.text.split() == good.split()


def test_every_reason_has_a_triggering_document(good: str) -> None:
    assert set(_crafted(good)) == set(REASONS)


@pytest.mark.parametrize("reason", REASONS)
def test_crafted_document_gets_its_reason(good: str, reason: str) -> None:
    text, policy = _crafted(good)[reason]
    assert _judge(text, policy) == Verdict(False, reason)


def test_reasons_are_stable_snake_case_and_cover_built_filters() -> None:
    assert len(REASONS) == len(set(REASONS))
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", r) for r in REASONS)
    assert {f.reason for f in build_filters(QualityPolicy())} == set(REASONS)


def test_policy_thresholds_change_the_verdict(good: str) -> None:
    text = " ".join(good.split()[:80]).rstrip(".") + "."
    assert _judge(text).accepted
    assert _judge(text, _policy(gopher_quality={"min_words": 120})) == Verdict(False, "gopher_below_min_words")
    bulleted = "\n".join("- " + s for s in _sentences(good))
    assert _judge(bulleted, _policy(gopher_quality={"max_bullet_lines_ratio": 1.0})).accepted
    assert _judge(GERMAN, _policy(language={"languages": ["de"]}, gopher_quality={"enabled": False})).accepted
    assert _judge(good, _policy(language={"enabled": True, "languages": ["de"]})) == Verdict(False, "language_not_allowed")


def test_disabled_families_do_not_reject(good: str) -> None:
    text = good + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    assert _judge(text, _policy(c4={"lorem_ipsum": False})).accepted
    assert _judge(text, _policy(c4={"enabled": False})) == Verdict(True, None, None)


def test_c4_removes_lines_and_returns_cleaned_text(good: str) -> None:
    js = "Please enable JavaScript to view the comments powered by Disqus."
    cookies = "This website uses cookies to improve your experience."
    v = _judge(f"{js}\n{good}\n{cookies}\nHome\n  ")
    assert v.accepted and v.text is not None
    assert js not in v.text and cookies not in v.text and "Home" not in v.text
    assert v.text.split() == good.split()
    cited = _judge(good.replace(".", ".[12]", 1))
    assert cited.accepted and "[12]" not in cited.text


def test_terminal_punctuation_rule_is_off_by_default_and_can_be_enabled(good: str) -> None:
    no_punct = "\n".join(s.rstrip(".") for s in _sentences(good)) + "\n" + "\n".join(_sentences(good)[:5])
    strict = _policy(c4={"filter_no_terminal_punct": True}, fineweb={"enabled": False})
    loose = _policy(fineweb={"enabled": False})
    assert _judge(no_punct, loose).accepted
    strict_v = _judge(no_punct, strict)
    assert strict_v.accepted and strict_v.text == "\n".join(_sentences(good)[:5])


def test_bad_policy_value_names_the_field_and_range() -> None:
    with pytest.raises(ValidationError) as e:
        QualityPolicy.model_validate({"gopher_quality": {"min_alpha_words_ratio": 1.5}})
    assert e.value.errors()[0]["loc"] == ("gopher_quality", "min_alpha_words_ratio")
    with pytest.raises(PolicyError, match=r"quality\.fineweb\.short_line_length.*allowed: ge 0"):
        parse_policy({"quality": {"fineweb": {"short_line_length": -1}}})
    with pytest.raises(PolicyError, match=r"quality\.c4\.lorem_ipsun"):
        parse_policy({"quality": {"c4": {"lorem_ipsun": False}}})
    with pytest.raises(PolicyError, match=r"quality\.language\.languages"):
        parse_policy({"quality": {"language": {"languages": ["English"]}}})


def test_same_text_same_verdict_after_the_word_memo_restarts(good: str) -> None:
    from policies.word_segmentation import VOCAB

    filters = build_filters(_policy())
    docs = english_docs(5, seed=3) + [good]
    before = [judge(d, filters) for d in docs]
    VOCAB.reset()
    assert [judge(d, filters) for d in docs] == before
