"""Languages without a profile of their own (issue 26, item 6): generic script profiles, calibrate-language, and a
language check that looks past the commands technical prose cites.

Text: translated manual pages (/usr/share/man/<lang>, the same programs' pages as the English ones compared) and
the Debian handbook (debian-handbook), through daemon/dev/multilingual_corpus.py; `languages` set, nothing else.
A few seconds; `-s` prints the figures.
"""

from __future__ import annotations

import json
import random

import pytest
import yaml

from daemon import cli
from daemon.dev import multilingual_corpus as mc
from policies.config import parse_policy
from policies.language_calibration import calibrate_profile, read_sample
from policies.language_id import langid_classifier, prose_for_language_id
from policies.quality import QualityPolicy, build_filters, generic_profile_languages, judge
from policies.text_statistics import sentence_count
from policies.word_segmentation import F_ALPHA, VOCAB, _split_chunk, word_ids

MAX_BEHIND_ENGLISH = 0.10
MIN_ROUND_TRIP = 0.90
N = 160  # documents per language and source: enough for a 10-point margin, few enough for seconds


def _docs(lang: str, source: str) -> list[str]:
    try:
        docs = mc.manpage_docs(lang) if source == "man" else mc.clean_docs(lang) if source == "handbook" else mc.section_docs(lang)
    except mc.HandbookMissing as e:
        pytest.fail(f"install debian-handbook and the manual pages (make install-test): {e}")
    docs = list(docs)
    random.Random(0).shuffle(docs)
    return docs[:N]


def _accepted(lang: str, docs: list[str], **quality: object) -> float:
    filters = build_filters(QualityPolicy.model_validate({"language": {"languages": [lang]}, **quality}))
    return sum(judge(d, filters).accepted for d in docs) / len(docs)


@pytest.mark.parametrize(("lang", "source"), [("ko", "man"), ("uk", "man"), ("fr", "man"), ("fa", "handbook")])
def test_clean_prose_accepted_within_10_points_of_english(lang: str, source: str) -> None:
    english = _accepted("en", _docs("en", source))
    theirs = _accepted(lang, _docs(lang, source))
    print(f"\n{lang} ({source}): {theirs:.1%} accepted, English {english:.1%}")
    assert theirs >= english - MAX_BEHIND_ENGLISH, f"{lang}: {theirs:.1%} accepted against English {english:.1%}"


def test_language_without_profile_gets_its_script_profile_and_a_warning(tmp_path, capsys) -> None:
    policy = QualityPolicy.model_validate({"language": {"languages": ["en", "ko", "uk", "fa", "it"]}})
    assert generic_profile_languages(policy) == {"ko": "hangul", "uk": "cyrillic", "fa": "arabic", "it": "latin"}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "quality": {"language": {"languages": ["ko", "fr"]}}}))
    with pytest.raises(SystemExit) as e:
        cli.main(["validate-policy", str(path)])
    assert e.value.code == 0
    err = capsys.readouterr().err
    assert "'ko' has no profile; judged by the generic hangul script profile" in err and "'fr'" not in err
    with pytest.raises(SystemExit):
        cli.main(["validate-policy", "--json", str(path)])
    assert json.loads(capsys.readouterr().out)["generic_language_profiles"] == {"ko": "hangul"}


def test_sentence_ends_and_words_in_scripts_without_case() -> None:
    # A full stop after a letter without case ends a sentence (it did only after a lowercase letter).
    assert _split_chunk("합니다.") == ["합니다", "."]
    assert sentence_count("첫 번째 문장입니다. 두 번째 문장입니다. 세 번째입니다.") == 3
    assert sentence_count("هذه جملة. وهذه جملة أخرى.") == 2
    assert sentence_count("Այս նախադասություն է։ Սա էլ մեկն է։") == 2
    assert _split_chunk("A.") == ["A."] and _split_chunk("U.S.") == ["U.S."]  # English abbreviations unchanged
    # Apostrophes inside a word and combining marks are part of the word, and make it alphabetic.
    for w in ("пам'ять", "пам’ять", "l'option", "aujourd'hui"):
        assert _split_chunk(w) == [w]
    ids = word_ids("ं ँ пам'ять", "whitespace")  # Devanagari signs on their own: marks, not symbols
    assert all(VOCAB.flags[i] & F_ALPHA for i in ids)


def test_calibrated_profile_round_trips_and_pastes_into_a_policy(tmp_path, capsys) -> None:
    for lang, source in (("uk", "man"), ("ko", "man")):
        docs = _docs(lang, source)
        fit, held_out = docs[::2], docs[1::2]
        cal = calibrate_profile(lang, fit)
        share = _accepted(lang, held_out, profiles={lang: cal.profile.overrides()})
        with capsys.disabled():
            print(f"\n{lang}: a profile calibrated on {len(fit)} documents accepts {share:.1%} of the other {len(held_out)}")
        assert share >= MIN_ROUND_TRIP, (lang, share, cal.yaml())
    # The CLI prints YAML that a policy takes as it is, and the language no longer needs a warning.
    sample = tmp_path / "ko.jsonl"
    sample.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in _docs("ko", "man")[::2]))
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate-language", "--lang", "ko", "--sample", str(sample)])
    assert e.value.code == 0
    pasted = yaml.safe_load(capsys.readouterr().out)
    policy = parse_policy({"quality": {"language": {"languages": ["ko"]}, **pasted["quality"]}}, "p.yaml")
    assert generic_profile_languages(policy.quality) == {}
    assert policy.quality.profiles["ko"].stop_words
    with pytest.raises(ValueError, match="at least 20 documents"):
        calibrate_profile("ko", _docs("ko", "man")[:5])


def test_language_check_looks_past_commands_options_and_paths() -> None:
    text = (
        "Lancez apt-get install --no-install-recommends puis éditez /etc/apt/sources.list (voir apt.conf(5)) : "
        "la variable HOME=/root et USERGROUPS_ENAB, le fichier myConfigFile.txt, la version 1.19.5 et l'option -j."
    )
    prose = prose_for_language_id(text, 600)
    for code in (
        "--no-install-recommends",
        "/etc/apt/sources.list",
        "apt.conf(5)",
        "HOME=/root",
        "USERGROUPS_ENAB",
        "myConfigFile.txt",
        "1.19.5",
        "-j.",
    ):
        assert code not in prose
    for word in ("Lancez", "éditez", "l'option", "variable", "apt-get"):
        assert word in prose
    # Handbook sections with their command screens: documents the model alone calls another language are
    # judged by their words, and none is rejected by the language check.
    lid = langid_classifier()
    for lang in ("fr", "fa"):
        docs = _docs(lang, "sections")
        filters = build_filters(QualityPolicy.model_validate({"language": {"languages": [lang]}}))
        raw = sum(lid.classify(d[:600])[0] != lang for d in docs)
        now = sum(judge(d, filters).reason in ("language_not_allowed", "language_low_score") for d in docs)
        print(f"\n{lang} sections: {raw} of {len(docs)} not {lang} to the model on the raw text, {now} rejected by the language check")
        assert now <= raw and now <= len(docs) // 100, (lang, raw, now)
    # The second look lets no other language through: English and German technical prose stay refused for French.
    french_only = build_filters(QualityPolicy.model_validate({"language": {"languages": ["fr"]}}))
    for lang in ("en", "de"):
        docs = _docs(lang, "sections")[:60]
        assert all(judge(d, french_only).reason in ("language_not_allowed", "language_low_score") for d in docs), lang


def test_calibration_sample_errors_name_the_line(tmp_path) -> None:
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"text": "un"}\n{"txt": "deux"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: not a JSON object with a 'text' field"):
        read_sample(bad)
    plain = tmp_path / "s.txt"
    plain.write_text("premier document\n\ndeux paragraphes\n---\nsecond document\n")
    assert read_sample(plain) == ["premier document\n\ndeux paragraphes", "second document"]
