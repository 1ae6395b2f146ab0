"""Quality filters beyond English: per-language profiles on real translated prose and on junk made from it.

The text is the Debian Administrator's Handbook as Debian's `debian-handbook`
package ships it (daemon/dev/multilingual_corpus.py keeps the paragraphs
actually translated). `make install-test` installs the package; if it is
missing here the fixture installs it with apt-get, and fails if it cannot:
these tests never skip. Run with `-s` to see the per-language table.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pydantic import ValidationError

from daemon.dev import multilingual_corpus as mc
from policies.config import PolicyError, parse_policy
from policies.language_profiles import BUILTIN_PROFILES, normalize_lang_field
from policies.quality import QualityPolicy, build_filters, judge, resolve_profile

LANGS = ("vi", "zh", "ja", "ru", "de", "ar")
MIN_CLEAN_ACCEPTED = 0.90
MIN_JUNK_REJECTED = 0.90


@pytest.fixture(scope="module")
def handbook() -> None:
    if not (mc.HANDBOOK / mc.LOCALES["vi"]).is_dir():
        apt = shutil.which("apt-get")
        assert apt, "debian-handbook is not installed and apt-get is missing: run `make install-test`"
        r = subprocess.run([apt, "install", "-y", "-qq", "debian-handbook"], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run([apt, "update", "-qq"], capture_output=True)
            r = subprocess.run([apt, "install", "-y", "-qq", "debian-handbook"], capture_output=True, text=True)
        assert r.returncode == 0, f"could not install debian-handbook (run `make install-test`): {r.stderr[-500:]}"
    missing = [loc for loc in mc.LOCALES.values() if not (mc.HANDBOOK / loc).is_dir()]
    assert not missing, f"debian-handbook lacks locales {missing}"


def _only_languages(lang: str) -> QualityPolicy:
    return QualityPolicy.model_validate({"language": {"languages": [lang]}})


@pytest.fixture(scope="module")
def figures(handbook: None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for lang in LANGS:
        filters = build_filters(_only_languages(lang))
        clean = mc.clean_docs(lang)
        junk = mc.junk_docs(lang)
        clean_v = [judge(d, filters) for d in clean]
        junk_v = [(kind, judge(d, filters)) for kind, d in junk]
        out[lang] = {
            "clean": len(clean),
            "accepted": sum(v.accepted for v in clean_v),
            "clean_rejections": sorted({v.reason for v in clean_v if v.reason}),
            "junk": len(junk),
            "rejected": sum(not v.accepted for _, v in junk_v),
            "junk_passed": sorted({k for k, v in junk_v if v.accepted}),
        }
    print("\nlanguage  clean docs  accepted        junk docs  rejected")
    for lang, f in out.items():
        print(
            f"{lang:8s}  {f['clean']:10d}  {f['accepted']:4d} ({f['accepted'] / f['clean']:6.1%})"
            f"  {f['junk']:9d}  {f['rejected']:4d} ({f['rejected'] / f['junk']:6.1%})"
        )
    return out


@pytest.mark.parametrize("lang", LANGS)
def test_clean_prose_accepted_and_junk_rejected(figures: dict[str, dict], lang: str) -> None:
    f = figures[lang]
    row = (
        f"{lang}: clean {f['accepted']}/{f['clean']} accepted (rejected for {f['clean_rejections']}), "
        f"junk {f['rejected']}/{f['junk']} rejected (kinds that passed: {f['junk_passed']})"
    )
    assert f["clean"] >= 50, row
    assert f["accepted"] / f["clean"] >= MIN_CLEAN_ACCEPTED, row
    assert f["rejected"] / f["junk"] >= MIN_JUNK_REJECTED, row


def test_corpus_keeps_only_translated_paragraphs(handbook: None) -> None:
    assert all(not mc.in_language(p, "vi") for p in mc.paragraphs("en")[0])
    for lang in LANGS:
        pars = [p for page in mc.paragraphs(lang) for p in page]
        assert all(mc.in_language(p, lang) for p in pars)
        assert not any(mc.in_language(p, "en") and not mc.in_language(p, lang) for p in pars)


def test_english_profile_is_the_sections_unchanged() -> None:
    policy = QualityPolicy()
    en, base = resolve_profile(policy, "en"), resolve_profile(policy, None)
    for name in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):
        assert getattr(en, name) == getattr(base, name) == getattr(policy, name)
    assert en.segmentation == "whitespace"
    assert set(BUILTIN_PROFILES) >= {"en", "de", "fr", "es", "ru", "vi", "zh", "ja", "ar", "hi"}


def test_policy_overrides_a_threshold_per_language(handbook: None) -> None:
    docs = mc.clean_docs("vi")[:20]
    strict = build_filters(QualityPolicy.model_validate({"language": {"languages": ["vi"]}, "profiles": {"vi": {"min_stop_words": 30}}}))
    assert {judge(d, strict).reason for d in docs} == {"gopher_few_stop_words"}
    # Other languages keep their profile; the override does not leak into the sections.
    policy = QualityPolicy.model_validate({"profiles": {"vi": {"min_stop_words": 30}}})
    assert policy.gopher_quality.min_stop_words == 2
    assert resolve_profile(policy, "de").gopher_quality.min_stop_words == 2
    # Own stop words for a language without a built-in profile switch the stop-word rule on for it.
    it = QualityPolicy.model_validate({"profiles": {"it": {"stop_words": ["di", "che", "il"], "min_stop_words": 2}}})
    assert resolve_profile(it, "it").gopher_quality.min_stop_words == 2
    assert resolve_profile(QualityPolicy(), "it").gopher_quality.min_stop_words == 0


@pytest.mark.parametrize(
    ("profiles", "message"),
    [
        ({"vi": {"min_stopwords": 1}}, "quality.profiles.vi.min_stopwords: Extra inputs are not permitted"),
        ({"VI": {"min_stop_words": 1}}, "lowercase ISO 639"),
        ({"vi": {"min_stop_words": -1}}, "quality.profiles.vi.min_stop_words: Input should be greater than or equal to 0"),
        ({"vi": {"segmentation": "jieba"}}, "quality.profiles.vi.segmentation"),
        ({"vi": {"min_stop_words": 40}}, "quality.profiles.vi: min_stop_words (40) is more than the 30 distinct stop words"),
        ({"de": {"min_mean_word_length": 20}}, "quality.profiles.de: min_mean_word_length (20.0) is above max_mean_word_length"),
        ({"zh": {"stop_words": ["的", "是"], "min_stop_words": 3}}, "min_stop_words (3) is more than the 2 distinct stop words"),
        ({"ja": {"stop_words": ["の あ"]}}, "single words"),
    ],
)
def test_profile_errors_name_the_field(profiles: dict, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy({"quality": {"profiles": profiles}}, "p.yaml")
    assert message in str(e.value), str(e.value)


def test_trusted_lang_field_picks_the_profile(handbook: None) -> None:
    zh = mc.clean_docs("zh")[:10]
    # Language check off, field trusted: the zh profile (character words) is used.
    trusting = build_filters(QualityPolicy.model_validate({"language": {"enabled": False, "trust_lang_field": True}}))
    assert all(judge(d, trusting, lang="zh-CN").accepted for d in zh)
    # Without a usable field the sections alone (English) judge it: Chinese fails them.
    assert not any(judge(d, trusting, lang=None).accepted for d in zh)
    assert not any(judge(d, trusting, lang="not a code").accepted for d in zh)
    # Language check on and the field trusted: the field is what is checked against `languages`.
    on = build_filters(QualityPolicy.model_validate({"language": {"languages": ["zh"], "trust_lang_field": True}}))
    assert all(judge(d, on, lang="zh").accepted for d in zh)
    assert {judge(d, on, lang="ja").reason for d in zh} == {"language_not_allowed"}
    # Not trusted (the default): the field is ignored, detection decides.
    default = build_filters(QualityPolicy.model_validate({"language": {"languages": ["zh"]}}))
    assert all(judge(d, default, lang="ja").accepted for d in zh)


def test_lang_field_normalization() -> None:
    assert normalize_lang_field("zh-CN") == "zh"
    assert normalize_lang_field("pt_BR") == "pt"
    assert normalize_lang_field(" EN ") == "en"
    assert normalize_lang_field("") is None
    assert normalize_lang_field("chinese simplified") is None
    assert normalize_lang_field("12") is None


def test_vietnamese_and_chinese_no_longer_fail_on_english_rules(handbook: None) -> None:
    """The issue's symptoms: vi rejected for English stop words, zh for whitespace word length."""
    for lang, old_reason in (("vi", "gopher_few_stop_words"), ("zh", "gopher_above_max_mean_word_length")):
        filters = build_filters(_only_languages(lang))
        reasons = {judge(d, filters).reason for d in mc.clean_docs(lang)}
        assert old_reason not in reasons


def test_language_codes_validated() -> None:
    with pytest.raises(ValidationError):
        QualityPolicy.model_validate({"language": {"trust_lang_field": "sometimes"}})
