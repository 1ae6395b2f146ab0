"""A deterministic, offline, mixed corpus for the demo, the quality-filter tests and the benches.

Real text comes from the installed Python's standard library: the docstrings
and comment blocks of its modules, which are English prose written by many
hands, with the code samples, tables and odd formatting real web text also
has. Junk comes from small generators, one per kind of page the filters are
meant to catch (boilerplate, lists, repeated lines, code, symbol soup,
non-English text ...), several of which dose their defect at random strength
so that the corpus has documents on both sides of every threshold, not just
the easy extremes. Everything is driven by one `random.Random(seed)`, and the
source files are read in sorted order, so a seed always gives the same corpus
on the same Python version.
"""

from __future__ import annotations

import functools
import random
import re
import sysconfig
from collections.abc import Callable
from pathlib import Path

_TRIPLE_QUOTED = re.compile(r'(?s)[rRbBuU]?("""|\'\'\')(.*?)\1')
_COMMENT_LINE = re.compile(r"^\s*#+ ?(.*)$")
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "encodings"}
_MAX_FILES = 900


def _paragraphs_of(source: str) -> list[str]:
    """Blank-line separated blocks of the docstrings and comment runs of one file."""
    blocks: list[str] = []
    for m in _TRIPLE_QUOTED.finditer(source):
        lines = [ln.strip() for ln in m.group(2).splitlines()]
        blocks.extend(_split_blocks(lines))
    run: list[str] = []
    for line in source.splitlines():
        cm = _COMMENT_LINE.match(line)
        if cm and not line.lstrip().startswith("#!"):
            run.append(cm.group(1).strip())
        elif run:
            blocks.extend(_split_blocks(run))
            run = []
    blocks.extend(_split_blocks(run))
    return blocks


def _split_blocks(lines: list[str]) -> list[str]:
    out, cur = [], []
    for ln in lines + [""]:
        if ln:
            cur.append(ln)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    return out


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, ...], ...]:
    """Paragraphs per stdlib file, files in sorted order (cached: reading them takes seconds)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])))[:_MAX_FILES]
    out = []
    for p in files:
        try:
            paras = _paragraphs_of(p.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        if len(paras) >= 3:
            out.append(tuple(paras))
    if not out:
        raise RuntimeError(f"no documented Python sources found under {root}")
    return tuple(out)


def _unwrap(par: str) -> str:
    return " ".join(par.split("\n"))


def _is_prose(par: str) -> bool:
    """A paragraph a careful reader would call running English text."""
    words = par.split()
    if len(words) < 12 or "{" in par or ">>>" in par or "`" in par or "lorem" in par.lower():
        return False
    if sum(w.rstrip(".,;:!?").isalpha() for w in words) < 0.9 * len(words):
        return False
    return par.rstrip().endswith((".", "?", "!")) and par[0].isupper()


@functools.lru_cache(maxsize=1)
def _prose_pool() -> tuple[str, ...]:
    seen: set[str] = set()
    pool = []
    for paras in _stdlib_files():
        for par in paras:
            text = _unwrap(par)
            if _is_prose(par) and text not in seen:
                seen.add(text)
                pool.append(text)
    return tuple(pool)


def _doc_size(rng: random.Random) -> int:
    """Sizes like a web crawl's: many short pages, a body around 4 KB, a long tail."""
    r = rng.random()
    if r < 0.25:
        return rng.randint(200, 1200)
    if r < 0.75:
        return rng.randint(3000, 5000)
    return rng.randint(1200, 9000)


def _real_doc(rng: random.Random, size: int | None = None) -> str:
    """Consecutive paragraphs of one module, as written (code samples and all)."""
    files = _stdlib_files()
    paras = files[rng.randrange(len(files))]
    size = size or _doc_size(rng)
    start = rng.randrange(len(paras))
    unwrap = rng.random() < 0.6
    out: list[str] = []
    n = 0
    i = start
    while n < size and i < start + len(paras):
        par = paras[i % len(paras)]
        par = _unwrap(par) if unwrap else par
        out.append(par)
        n += len(par) + 2
        i += 1
    return "\n\n".join(out)


def _prose(rng: random.Random, size: int) -> list[str]:
    pool = _prose_pool()
    out, n = [], 0
    while n < size:
        par = pool[rng.randrange(len(pool))]
        out.append(par)
        n += len(par) + 1
    return out


# ---- junk generators: each takes the rng and returns one document ----------

_NAV = [
    "Home",
    "About us",
    "Contact",
    "Blog",
    "Shop",
    "Login",
    "Sign up",
    "FAQ",
    "Careers",
    "News",
    "Products",
    "Services",
    "Support",
    "Downloads",
    "Press",
    "Partners",
    "Sitemap",
    "Search",
]
_JS = [
    "Please enable JavaScript to view the comments powered by Disqus.",
    "JavaScript is disabled in your browser, some features will not work.",
    "You need to enable JavaScript to run this app.",
    "This page requires JavaScript to display the interactive map correctly.",
]
_POLICY = [
    "This website uses cookies to improve your experience while you navigate.",
    "By continuing to browse you agree to our use of cookies and our privacy policy.",
    "Read our terms of use and cookie policy before posting a comment here.",
    "We use cookies to personalise content and ads and to analyse our traffic.",
]
_LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat."
)
_CODE = [
    "function init() {",
    "  var el = document.getElementById('main');",
    "  if (el) { el.style.display = 'none'; }",
    "}",
    "for (int i = 0; i < n; i++) {",
    "  total += values[i];",
    "}",
    "const config = { debug: true, retries: 3 };",
    "body { margin: 0; padding: 0; font-family: sans-serif; }",
    "if (x > 0) { return x; } else { return -x; }",
]
_SPAM = [
    "buy cheap shoes online",
    "best price guaranteed",
    "free shipping today",
    "click here now",
    "limited time offer",
    "top rated seller",
]
_WORDS = {
    "de": (
        "der die das und ist nicht ein eine zu mit auf für von im den des dem wir sie es auch "
        "werden haben nach bei über unter zwischen heute morgen immer wieder schnell langsam Haus Stadt "
        "Straße Wasser Arbeit Zeit Leben Menschen Regierung Schule Kinder Wetter Geschichte Beispiel "
        "Entwicklung Unternehmen Wirtschaft Gesellschaft groß klein neu alt wichtig möglich schwierig "
        "gesagt gemacht gefunden gesehen geschrieben erklärt verstanden"
    ).split(),
    "fr": (
        "le la les et est pas un une de du des avec pour sur dans nous vous ils elle aussi être avoir "
        "après chez sous entre aujourd'hui demain toujours encore vite lentement maison ville rue eau "
        "travail temps vie gens gouvernement école enfants météo histoire exemple développement "
        "entreprise économie société grand petit nouveau vieux important possible difficile dit fait "
        "trouvé vu écrit expliqué compris"
    ).split(),
    "es": (
        "el la los las y es no un una de del con para sobre en nosotros ellos ella también ser tener "
        "después entre hoy mañana siempre otra vez rápido despacio casa ciudad calle agua trabajo tiempo "
        "vida gente gobierno escuela niños clima historia ejemplo desarrollo empresa economía sociedad "
        "grande pequeño nuevo viejo importante posible difícil dicho hecho encontrado visto escrito"
    ).split(),
}


def _sentence(rng: random.Random, words: list[str], lo: int = 6, hi: int = 16) -> str:
    s = " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!"])


def _foreign(rng: random.Random) -> str:
    words = _WORDS[rng.choice(sorted(_WORDS))]
    paras = [" ".join(_sentence(rng, words) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(2, 8))]
    return "\n\n".join(paras)


def _with_lines(rng: random.Random, lines: list[str], count: int) -> str:
    """Real prose with boilerplate lines spliced in at random places."""
    paras = _prose(rng, _doc_size(rng))
    for _ in range(count):
        paras.insert(rng.randrange(len(paras) + 1), rng.choice(lines))
    return "\n".join(paras)


def _repeated_lines(rng: random.Random) -> str:
    base = _prose(rng, rng.randint(300, 3000))
    reps = rng.randint(1, 4)
    k = rng.randint(1, max(1, len(base) // 2))
    paras = base + [p for p in base[:k] for _ in range(reps)]
    rng.shuffle(paras)
    return "\n".join(paras)


def _repeated_paragraphs(rng: random.Random) -> str:
    base = _prose(rng, rng.randint(1000, 5000))
    dup = rng.sample(base, k=rng.randint(0, max(0, len(base) // 3)))
    paras = base + dup
    rng.shuffle(paras)
    return "\n\n".join(paras)


def _bullets(rng: random.Random) -> str:
    mark = rng.choice(["• ", "- ", "* ", "-"])
    items = [mark + " ".join(rng.choice(p.split())[:20] for _ in range(rng.randint(2, 9))) for p in _prose(rng, 800)]
    head = _prose(rng, rng.randint(0, 600))
    return "\n".join(head + items + [mark + it for it in rng.sample(_NAV, 4)])


def _javascript(rng: random.Random) -> str:
    return _with_lines(rng, _JS, rng.randint(1, 6))


def _policy(rng: random.Random) -> str:
    return _with_lines(rng, _POLICY, rng.randint(1, 8))


def _lorem(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "\n\n".join(_LOREM for _ in range(rng.randint(1, 5)))
    return _with_lines(rng, [_LOREM], 1)


def _curly(rng: random.Random) -> str:
    return _with_lines(rng, _CODE, rng.randint(1, 10))


def _short_lines(rng: random.Random) -> str:
    nav = [rng.choice(_NAV) for _ in range(rng.randint(10, 60))]
    body = _prose(rng, rng.randint(0, 2500))
    return "\n".join(nav[: len(nav) // 2] + body + nav[len(nav) // 2 :])


def _symbols(rng: random.Random) -> str:
    paras = _prose(rng, rng.randint(500, 4000))
    out = []
    for p in paras:
        w = p.split()
        for _ in range(rng.randint(0, len(w) // 3)):
            w.insert(rng.randrange(len(w) + 1), rng.choice(["#tag", "###", "...", "…", "#", "$$$", "%%", "*"]))
        out.append(" ".join(w))
    return "\n\n".join(out)


def _ellipsis_lines(rng: random.Random) -> str:
    paras = _prose(rng, rng.randint(500, 4000))
    return "\n".join(p[: rng.randint(40, 160)].rstrip() + "..." if rng.random() < 0.6 else p for p in paras)


def _numbers(rng: random.Random) -> str:
    rows = [" | ".join(f"{rng.uniform(0, 1e4):.2f}" for _ in range(rng.randint(3, 8))) for _ in range(rng.randint(5, 80))]
    return "\n".join(_prose(rng, rng.randint(0, 1500)) + rows)


def _long_words(rng: random.Random) -> str:
    paras = _prose(rng, rng.randint(300, 3000))
    out = []
    for p in paras:
        w = p.split()
        out.append(" ".join("".join(w[i : i + rng.randint(2, 4)]) for i in range(0, len(w), 3)))
    return "\n\n".join(out)


def _spam_ngrams(rng: random.Random) -> str:
    phrase = rng.choice(_SPAM)
    paras = _prose(rng, rng.randint(500, 4000))
    k = rng.randint(1, 25)
    for _ in range(k):
        paras.insert(rng.randrange(len(paras) + 1), " ".join([phrase] * rng.randint(1, 4)) + ".")
    return "\n".join(paras)


def _no_punct_lines(rng: random.Random) -> str:
    paras = _prose(rng, rng.randint(500, 5000))
    return "\n".join(p.rstrip(".!?") if rng.random() < 0.9 else p for p in paras)


def _word_per_line(rng: random.Random) -> str:
    return "\n".join(w for p in _prose(rng, rng.randint(200, 2000)) for w in p.split())


def _short_doc(rng: random.Random) -> str:
    return " ".join(rng.choice(_prose_pool()).split()[: rng.randint(3, 70)])


def _cut_wrapped(rng: random.Random) -> str:
    """Prose hard-wrapped at a random width: few lines end in punctuation, some lines are short."""
    width = rng.randint(20, 90)
    out = []
    for p in _prose(rng, _doc_size(rng)):
        words, line = p.split(), ""
        for w in words:
            if line and len(line) + len(w) + 1 > width:
                out.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        out.append(line)
    return "\n".join(out)


_JUNK: tuple[Callable[[random.Random], str], ...] = (
    _repeated_lines,
    _repeated_paragraphs,
    _bullets,
    _javascript,
    _policy,
    _lorem,
    _curly,
    _short_lines,
    _symbols,
    _ellipsis_lines,
    _numbers,
    _long_words,
    _spam_ngrams,
    _no_punct_lines,
    _word_per_line,
    _short_doc,
    _cut_wrapped,
    _foreign,
)


def mixed_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` documents: about half real stdlib text as written, half junk of every kind the filters target."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        if rng.random() < 0.5:
            docs.append(_real_doc(rng))
        else:
            docs.append(rng.choice(_JUNK)(rng))
    return docs


@functools.lru_cache(maxsize=4)
def _package_prose_pool(packages: tuple[str, ...]) -> tuple[str, ...]:
    """Prose paragraphs of installed packages' docstrings: a second, real domain (ML library documentation)."""
    import importlib.util

    seen: set[str] = set()
    pool = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        files = sorted(p for p in root.rglob("*.py") if not {"test", "tests"} & set(p.relative_to(root).parts))[:_MAX_FILES]
        for p in files:
            try:
                paras = _paragraphs_of(p.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            for par in paras:
                text = _unwrap(par)
                if _is_prose(par) and text not in seen:
                    seen.add(text)
                    pool.append(text)
    if len(pool) < 50:
        raise RuntimeError(f"too little documentation prose in packages {packages}")
    return tuple(pool)


def domain_docs(n: int, packages: tuple[str, ...] = ("torch", "transformers"), target_bytes: int = 2048, seed: int = 0) -> list[str]:
    """`n` prose documents from the docstrings of `packages`: a shifted domain (tensors, gradients, tokenizers)
    against the standard library's general prose, for showing drift and adaptation offline."""
    return _compose(random.Random(seed), _package_prose_pool(tuple(packages)), n, target_bytes)


def english_docs(n: int, target_bytes: int = 4096, seed: int = 0) -> list[str]:
    """`n` clean English prose documents of about `target_bytes` each (what a throughput bench should chew)."""
    return _compose(random.Random(seed), _prose_pool(), n, target_bytes)


def _compose(rng: random.Random, pool: tuple[str, ...], n: int, target_bytes: int) -> list[str]:
    docs = []
    for _ in range(n):
        order = rng.sample(range(len(pool)), k=min(len(pool), 200))
        out: list[str] = []
        size = 0
        for i in order:
            par = pool[i]
            if size + len(par) + 1 > target_bytes and out:
                if size >= 0.8 * target_bytes:
                    break
                continue
            out.append(par)
            size += len(par) + 1
        docs.append("\n".join(out))
    return docs


def light_paraphrase(text: str, rng: random.Random, vocab: list[str], frac: float = 0.08) -> str:
    """A light rewrite of `text`: `frac` of its words replaced from `vocab` or dropped, a few adjacent pairs swapped,
    line by line (how a generation reposted with small edits looks to near-duplicate detection)."""
    out = []
    for line in text.split("\n"):
        words = []
        for w in line.split():
            r = rng.random()
            if r < frac / 2:
                words.append(rng.choice(vocab))
            elif r >= frac:
                words.append(w)
        swaps = len(words) // 50 + (rng.random() < len(words) / 50)
        for _ in range(swaps if len(words) > 1 else 0):  # a one-word line has no pair to swap
            j = rng.randrange(len(words) - 1)
            words[j], words[j + 1] = words[j + 1], words[j]
        if words and line.rstrip()[-1:] in ".!?" and words[-1][-1:] not in ".!?":
            words[-1] += line.rstrip()[-1]  # keep the line's end punctuation where an edit moved it
        out.append(" ".join(words))
    return "\n".join(out)
