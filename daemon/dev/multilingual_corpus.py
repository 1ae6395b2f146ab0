"""Clean prose and junk in several languages, from the translations of Debian's `debian-handbook` package.

The package ships the Debian Administrator's Handbook as HTML in many locales
(/usr/share/doc/debian-handbook/html/<locale>/). Many paragraphs of a
translation are still English, so a paragraph is kept only when it is written
in the target language, judged by its script (and, for the Latin-script
languages, by function words and letters English never uses) — not by the
language identifier the filters use, so the selection does not decide the
filters' language check for them.

* `clean_docs(lang)`: consecutive translated paragraphs of one page, joined
  with blank lines into documents of about `target_chars` characters (at least
  two paragraphs), as a web page's body would be.
* `section_docs(lang)`: the same with the command screens and listings
  between the paragraphs (technical prose as the handbook shows it).
* `manpage_docs(lang)`: translated manual pages (/usr/share/man/<lang>; for
  "en", the English pages of the programs the Ukrainian ones cover), roff
  turned into paragraphs, for languages the handbook lacks or barely has
  (uk, ko), joined as `clean_docs` joins the handbook's.
* `junk_docs(lang)`: pages a quality filter should refuse, made from that same
  language's text: menus/boilerplate, repeated lines, symbol soup, ellipsis
  teasers, keyword lists, repeated-phrase spam, number tables, one-liners.

Everything is deterministic for a given package version and seed. The
handbook has no Hindi or Ukrainian translation (nor th), and its Korean one
is a few pages; `LOCALES` and `MAN_LOCALES` list what is used.
"""

from __future__ import annotations

import functools
import html
import random
import re
from pathlib import Path

HANDBOOK = Path("/usr/share/doc/debian-handbook/html")
LOCALES = {
    "vi": "vi-VN",
    "zh": "zh-CN",
    "ja": "ja-JP",
    "ru": "ru-RU",
    "de": "de-DE",
    "ar": "ar-MA",
    "fr": "fr-FR",
    "es": "es-ES",
    "en": "en-US",
    # Languages without a built-in profile (judged by the generic profile of their script).
    "ko": "ko-KR",
    "fa": "fa-IR",
}
CJK = ("zh", "ja")
DENSE = (*CJK, "ko")  # scripts that say as much in about half the characters: half-length documents

_PARA = re.compile(r'<div class="para">(.*?)</div>', re.S)
_TITLE = re.compile(r'<h[1-4] class="title">(.*?)</h[1-4]>', re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_EN_FUNCTION = {"the", "and", "of", "to", "is", "are", "this", "that", "with", "for", "which", "it", "be", "on", "can"}
# Function words that do not occur in English, per Latin-script language.
_FUNCTION = {
    "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "zu", "den", "auf", "für", "sich", "werden", "wird"},
    "fr": {"le", "la", "les", "et", "est", "des", "une", "du", "pour", "dans", "qui", "que", "sur", "avec", "pas", "sont"},
    "es": {"el", "la", "los", "las", "y", "es", "del", "una", "que", "para", "con", "por", "se", "en", "como", "su"},
    "vi": {"và", "là", "của", "các", "có", "được", "trong", "cho", "một", "những", "với", "không", "này", "để", "khi", "từ"},
}


_VI_LETTERS = frozenset("ạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹđơư")


class HandbookMissing(RuntimeError):
    """The debian-handbook package is not installed (`make install-test` installs it)."""


def _script_share(text: str, lang: str) -> float:
    """Share of letters written in the language's script."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    if lang == "zh":
        ok = sum("\u4e00" <= c <= "\u9fff" for c in letters)
    elif lang == "ja":
        ok = sum("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in letters)
    elif lang in ("ru", "uk"):
        ok = sum("\u0400" <= c <= "\u04ff" for c in letters)
    elif lang in ("ar", "fa"):
        ok = sum("\u0600" <= c <= "\u06ff" or "\u0750" <= c <= "\u077f" for c in letters)
    elif lang == "ko":
        ok = sum("\uac00" <= c <= "\ud7a3" or "\u1100" <= c <= "\u11ff" or "\u3130" <= c <= "\u318f" for c in letters)
    else:
        return 1.0
    return ok / len(letters)


def in_language(par: str, lang: str) -> bool:
    """Is this paragraph written in `lang` (rather than left in English)?"""
    if lang == "uk" and (not any(c in "іїєґІЇЄҐ" for c in par) or any(c in "ыэъЫЭЪ" for c in par)):
        return False  # Ukrainian letters, and none that only Russian uses
    if lang in ("zh", "ja", "ru", "ar", "ko", "uk", "fa"):
        if lang == "ja" and not any("\u3040" <= c <= "\u30ff" for c in par):
            return False  # Japanese prose always has kana; Chinese has none
        if lang == "zh" and any("\u3040" <= c <= "\u30ff" for c in par):
            return False
        return _script_share(par, lang) >= 0.5
    words = [w.strip(".,;:()«»\"'!?").lower() for w in par.split()]
    if lang == "en":
        return sum(w in _EN_FUNCTION for w in words) >= 0.08 * len(words)
    theirs = sum(w in _FUNCTION[lang] for w in words)
    english = sum(w in _EN_FUNCTION for w in words)
    if lang == "vi":  # Vietnamese letters with stacked diacritics, which no other language here uses
        marks = sum(c in _VI_LETTERS for c in par.lower())
        return theirs >= 0.1 * len(words) and marks >= 3 and english < theirs / 2
    return theirs >= 0.1 * len(words) and english < theirs / 2


def _clean(fragment: str) -> str:
    return _SPACE.sub(" ", html.unescape(_TAG.sub("", fragment))).strip()


def _pages(lang: str) -> list[Path]:
    root = HANDBOOK / LOCALES[lang]
    if not root.is_dir():
        raise HandbookMissing(f"{root} not found: install the Debian package debian-handbook (make install-test does)")
    return sorted(root.glob("*.html"))


@functools.cache
def paragraphs(lang: str) -> tuple[tuple[str, ...], ...]:
    """Per page, its translated prose paragraphs in order (at least 40 characters, CJK 20)."""
    out = []
    floor = 20 if lang in CJK else 40
    for page in _pages(lang):
        text = page.read_text(encoding="utf-8", errors="replace")
        pars = [p for p in (_clean(m) for m in _PARA.findall(text)) if len(p) >= floor and in_language(p, lang)]
        if pars:
            out.append(tuple(pars))
    return tuple(out)


@functools.cache
def titles(lang: str) -> tuple[str, ...]:
    """Section titles of the translation (menu items for the boilerplate junk)."""
    seen: dict[str, None] = {}
    for page in _pages(lang):
        for m in _TITLE.findall(page.read_text(encoding="utf-8", errors="replace")):
            t = re.sub(r"^[\d.]+\s*", "", _clean(m))
            if 2 <= len(t) <= 40 and in_language(t + " " + t, lang) or (lang in CJK and t and _script_share(t, lang) > 0.5):
                seen.setdefault(t)
    return tuple(seen)


_BLOCK = re.compile(r'<div class="para">(.*?)</div>|<pre class="(?:screen|programlisting)">(.*?)</pre>', re.S)


@functools.cache
def sections(lang: str) -> tuple[tuple[str, ...], ...]:
    """Per page, its translated paragraphs with the command screens and listings between them, in order.

    Technical prose as the handbook shows it: the text cites commands, options and files, and the screens
    (commands with their output, configuration files) are the same in every translation.
    """
    out = []
    floor = 20 if lang in CJK else 40
    for page in _pages(lang):
        blocks = []
        for m in _BLOCK.finditer(page.read_text(encoding="utf-8", errors="replace")):
            if m.group(1) is not None:
                p = _clean(m.group(1))
                if len(p) >= floor and in_language(p, lang):
                    blocks.append(p)
            elif blocks:  # a screen after a translated paragraph: its lines, markup removed
                screen = "\n".join(x.rstrip() for x in html.unescape(_TAG.sub("", m.group(2))).strip().splitlines() if x.strip())
                if screen:
                    blocks.append(screen)
        if blocks:
            out.append(tuple(blocks))
    return tuple(out)


def section_docs(lang: str, target_chars: int | None = None) -> list[str]:
    """Documents of consecutive blocks of one page (`sections`), most of whose characters are translated prose."""
    docs = _documents(sections(lang), target_chars or (700 if lang in DENSE else 1500))
    floor = 20 if lang in CJK else 40
    return [d for d in docs if sum(len(p) for p in d.split("\n\n") if len(p) >= floor and in_language(p, lang)) > len(d) / 2]


def clean_docs(lang: str, target_chars: int | None = None) -> list[str]:
    """Documents of consecutive translated paragraphs of one page, about `target_chars` long, two paragraphs at least."""
    return _documents(paragraphs(lang), target_chars or (700 if lang in DENSE else 1500))


MANPAGES = Path("/usr/share/man")
# Translated manual pages: the handbook has no Ukrainian; these are the same programs' pages (shadow, procps, xz ...).
MAN_LOCALES = {"uk": "uk", "fr": "fr", "ko": "ko"}
_ROFF_ESCAPES = {"-": "-", "&": "", "e": "\\", " ": " ", "~": " ", "|": "", "^": "", "c": "", "%": "", "0": " ", "'": "'", "`": "`"}
_ROFF_NAMED = {"aq": "'", "em": "—", "en": "–", "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "dq": '"', "bu": "•", "co": "©", "mu": "×"}
_ROFF_ESC = re.compile(r"\\(?:f(?:\(..|\[[^]]*]|.)|\((..)|\[([^]]*)]|\*(?:\(..|\[[^]]*]|.)|(.))")
_ROFF_FONT_MACROS = {".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".SM", ".SB"}


def _roff_text(line: str) -> str:
    def esc(m: re.Match[str]) -> str:
        s = m.group(0)
        if s.startswith(("\\f", "\\*")):
            return "'" if "Aq" in s else ""  # font change, or a string (Aq: the apostrophe)
        if m.group(1) is not None or m.group(2) is not None:
            return _ROFF_NAMED.get(m.group(1) or m.group(2), "")
        return _ROFF_ESCAPES.get(m.group(3) or "", "")

    return _ROFF_ESC.sub(esc, line)


def _roff_paragraphs(source: str) -> list[str]:
    """Running-text paragraphs of a man page's roff source: text lines (and font macros' text) between layout macros."""
    out: list[str] = []
    cur: list[str] = []
    table = False
    for raw in source.splitlines():
        if raw.startswith((".TS", ".TE")):
            table = raw.startswith(".TS")  # tables are not running text
            continue
        if table or raw.startswith(('.\\"', "'\\\"")):
            continue
        if raw.startswith((".", "'")):
            macro, _, rest = raw.partition(" ")
            if macro in _ROFF_FONT_MACROS:
                cur.append(rest.replace('"', ""))
                continue
            if cur:
                out.append(" ".join(cur))
                cur = []
            continue
        cur.append(raw)
    if cur:
        out.append(" ".join(cur))
    return [_SPACE.sub(" ", _roff_text(p)).strip() for p in out]


@functools.cache
def manpage_paragraphs(lang: str, with_commands: bool = False) -> tuple[tuple[str, ...], ...]:
    """Per translated man page (for "en": the English pages of the same programs as the Ukrainian ones), its prose paragraphs.

    `with_commands`: also the paragraphs in no language (option lists, command lines, paths) where the page has them,
    as a rendered page shows them; still never a paragraph left in English.
    """
    import gzip

    sub = MAN_LOCALES.get(lang)
    if lang == "en":
        names = {p.name for p in (MANPAGES / "uk").glob("man*/*.gz")}
        files = sorted(p for p in MANPAGES.glob("man*/*.gz") if p.name in names)
    elif sub:
        files = sorted((MANPAGES / sub).glob("man*/*.gz"))
    else:
        raise ValueError(f"no translated man pages for {lang!r}")
    if not files:
        raise HandbookMissing(f"no man pages under {MANPAGES} for {lang!r} (the Debian packages' translated manuals)")
    out = []
    for f in files:
        pars = [
            p
            for p in _roff_paragraphs(gzip.decompress(f.read_bytes()).decode("utf-8", "replace"))
            if len(p) >= 40
            and in_language(p, lang)
            or with_commands
            and len(p) >= 8
            and (lang == "en" or not in_language(p, "en") and _script_share(p, lang) < 0.5)
        ]
        if pars:
            out.append(tuple(pars))
    return tuple(out)


def manpage_docs(lang: str, target_chars: int | None = None, with_commands: bool = False) -> list[str]:
    """Documents of consecutive paragraphs of one man page, as `clean_docs` joins the handbook's.

    With commands, a document is kept only if most of its characters are paragraphs in the language.
    """
    docs = _documents(manpage_paragraphs(lang, with_commands), target_chars or (700 if lang in DENSE else 1500))
    if with_commands:
        docs = [d for d in docs if sum(len(p) for p in d.split("\n\n") if len(p) >= 40 and in_language(p, lang)) > len(d) / 2]
    return docs


def _documents(pages: tuple[tuple[str, ...], ...], target: int) -> list[str]:
    docs = []
    for pars in pages:
        cur: list[str] = []
        for p in pars:
            cur.append(p)
            if sum(map(len, cur)) >= target and len(cur) >= 2:
                docs.append("\n\n".join(cur))
                cur = []
        if len(cur) >= 2 and sum(map(len, cur)) >= target // 2:
            docs.append("\n\n".join(cur))
    return docs


def _words(lang: str, text: str) -> list[str]:
    """Units to shuffle: characters for Chinese and Japanese, whitespace words elsewhere."""
    if lang in CJK:
        return [c for c in text if not c.isspace()]
    return text.split()


def _sentences(lang: str, text: str) -> list[str]:
    parts = re.split(r"(?<=[。！？])" if lang in CJK else r"(?<=[.!?؟])\s+", text)
    return [s.strip() for s in parts if len(s.strip()) > 5]


def junk_docs(lang: str, n: int = 80, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, text) pages a quality filter should refuse, built from the language's own handbook text."""
    rng = random.Random(f"{lang}:{seed}")
    pars = [p for page in paragraphs(lang) for p in page]
    sents = [s for p in pars for s in _sentences(lang, p)]
    menu = list(titles(lang)) or [s[:20] for s in sents]
    sep = "" if lang in CJK else " "

    def prose(k: int) -> list[str]:
        i = rng.randrange(len(pars))
        return pars[i : i + k] or pars[:k]

    def menu_page() -> str:  # navigation and boilerplate: one short item per line, a sentence or two of body
        items = [rng.choice(menu) for _ in range(rng.randint(20, 50))]
        return "\n".join(items[:10] + [rng.choice(sents)] + items[10:])

    def repeated_lines() -> str:
        base = [rng.choice(sents) for _ in range(rng.randint(3, 6))]
        lines = [rng.choice(base) for _ in range(rng.randint(15, 40))]
        return "\n".join(lines)

    def symbol_soup() -> str:
        out = []
        for p in prose(3):
            w = _words(lang, p)
            for _ in range(len(w) // 2):
                w.insert(rng.randrange(len(w) + 1), rng.choice(["#", "###", "★★★", "...", "|", "»»", ">>>", "#tag", "$$$", "%%"]))
            out.append(" ".join(w))
        return "\n\n".join(out)

    def teasers() -> str:  # "read more..." listings: every line cut off with an ellipsis
        out = []
        for s in rng.sample(sents, min(len(sents), rng.randint(8, 20))):
            w = _words(lang, s)
            out.append(sep.join(w[: rng.randint(4, 12)]) + rng.choice(["...", "…"]))
        return "\n".join(out)

    def keywords() -> str:  # keyword stuffing: content-looking words, no grammar, comma separated
        w = [x for p in prose(3) for x in _words(lang, p) if len(x) >= (1 if lang in CJK else 5)]
        rng.shuffle(w)
        if lang in CJK:
            w = ["".join(w[i : i + rng.randint(2, 4)]) for i in range(0, len(w), 3)]
        return ", ".join(w[:120])

    def spam() -> str:
        phrase = sep.join(_words(lang, rng.choice(sents))[:6])
        return "\n".join(rng.sample(sents, 3) + [sep.join([phrase] * rng.randint(6, 12)) for _ in range(rng.randint(3, 8))])

    def table() -> str:
        rows = [" | ".join(f"{rng.uniform(0, 1e4):.2f}" for _ in range(rng.randint(3, 8))) for _ in range(rng.randint(20, 60))]
        return "\n".join([rng.choice(sents)] + rows)

    def one_liner() -> str:
        return rng.choice(sents)

    kinds = [menu_page, repeated_lines, symbol_soup, teasers, keywords, spam, table, one_liner]
    return [(k.__name__, k()) for k in (kinds[i % len(kinds)] for i in range(n))]
