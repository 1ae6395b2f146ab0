"""Offline test sets for echo detection: completions, the ways they come back, and human documents of the same domain.

No model runs here. A "completion" is a passage of real prose of the length a
served model writes (100 to 300 words); the human documents come from the same
corpus (same domain, same style, same stock phrases) but from other source files
or pages, so a human document that matches a completion is a false positive and
not a true copy. Two domains: the standard library's docstring prose
(`sample_corpus`) and the English Debian Administrator's Handbook
(`multilingual_corpus`). The edits are the ones issue 26 measured:

* `exact`: the completion as written;
* `replace10`: 10% of the words replaced by words of the domain;
* `rewrite25`: a quarter of the words replaced and the sentences shuffled;
* `first_half`: only the first half of the words;
* `embedded`: put between paragraphs of a human document twice its length (a third of the result).

Everything follows from one seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from daemon.dev.multilingual_corpus import paragraphs as handbook_paragraphs
from daemon.dev.sample_corpus import _is_prose, _stdlib_files, _unwrap

EDITS = ("exact", "replace10", "rewrite25", "first_half", "embedded")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class EchoCases:
    completions: list[str]  # what the served model wrote (indexed)
    edited: dict[str, list[str]]  # edit -> one document per completion, in the completions' order
    human: list[str]  # documents of the same domain from sources no completion was cut from


def _sources(domain: str) -> list[list[str]]:
    """Prose paragraphs per source file (stdlib) or page (handbook), in a fixed order."""
    if domain == "stdlib":
        return [[_unwrap(p) for p in paras if _is_prose(p)] for paras in _stdlib_files()]
    if domain == "handbook":
        return [list(paras) for paras in handbook_paragraphs("en")]
    raise ValueError(f"unknown domain {domain!r} (stdlib or handbook)")


def _grams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = text.lower().split()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _not_copied(paras: list[str], seen: set[tuple[str, ...]]) -> list[str]:
    """The paragraphs with at most a fifth of their word 5-grams on the model side (`seen`): sources copy each other (licence
    texts, a pure-Python module and its twin), and such a copy in a human document would be a true echo, not a false one."""
    return [p for p in paras if (g := _grams(p)) and len(g & seen) <= 0.2 * len(g)]


def _passage(rng: random.Random, sources: list[list[str]], words: int) -> str:
    """Consecutive paragraphs of one source, cut to about `words` words (whole paragraphs, the last one cut)."""
    while True:
        paras = sources[rng.randrange(len(sources))]
        if sum(len(p.split()) for p in paras) < words // 2:
            continue
        out: list[str] = []
        n = 0
        for p in paras[rng.randrange(len(paras)) :] + paras:
            w = p.split()
            out.append(" ".join(w[: words - n]))
            n += min(len(w), words - n)
            if n >= words:
                break
        return "\n\n".join(out)


def _replace(text: str, rng: random.Random, vocab: list[str], frac: float) -> str:
    """`frac` of the words (per paragraph, layout kept) replaced by another word of the domain."""
    return "\n\n".join(" ".join(rng.choice(vocab) if rng.random() < frac else w for w in p.split()) for p in text.split("\n\n"))


def _shuffle_sentences(text: str, rng: random.Random) -> str:
    sentences = [s for p in text.split("\n\n") for s in _SENTENCE_END.split(p) if s]
    rng.shuffle(sentences)
    return " ".join(sentences)


def _embed(completion: str, host: str, rng: random.Random) -> str:
    """The completion as one block between the host's paragraphs (the host cut to twice the completion's length)."""
    want = 2 * len(completion.split())
    paras, n = [], 0
    for p in host.split("\n\n"):
        w = p.split()
        paras.append(" ".join(w[: want - n]))
        n += min(len(w), want - n)
        if n >= want:
            break
    at = rng.randrange(len(paras) + 1)
    return "\n\n".join([*paras[:at], completion, *paras[at:]])


def echo_cases(domain: str, n_completions: int, n_human: int, seed: int = 0, words: tuple[int, int] = (100, 300)) -> EchoCases:
    """Completions from even-numbered sources, of `words` words (the demo model's real ones: 50 to 150), human
    documents (and embedding hosts) from odd-numbered ones."""
    rng = random.Random(seed)
    sources = _sources(domain)
    model_side = [s for s in sources[0::2] if s]
    seen = {g for paras in model_side for p in paras for g in _grams(p)}
    human_side = [s for s in (_not_copied(s, seen) for s in sources[1::2]) if s]
    completions = [_passage(rng, model_side, rng.randint(*words)) for _ in range(n_completions)]
    human = [_passage(rng, human_side, rng.choice([60, 150, 300, 600, 600, 1200])) for _ in range(n_human)]
    vocab = [w for paras in human_side[:50] for p in paras for w in p.split()]  # replacements from the domain
    hosts = [_passage(rng, human_side, 700) for _ in completions]
    return EchoCases(completions, _edits(completions, vocab, hosts, rng), human)


def _edits(completions: list[str], vocab: list[str], hosts: list[str], rng: random.Random) -> dict[str, list[str]]:
    return {
        "exact": list(completions),
        "replace10": [_replace(c, rng, vocab, 0.10) for c in completions],
        "rewrite25": [_shuffle_sentences(_replace(c, rng, vocab, 0.25), rng) for c in completions],
        "first_half": [" ".join(c.split()[: len(c.split()) // 2]) for c in completions],
        "embedded": [_embed(c, h, rng) for c, h in zip(completions, hosts, strict=True)],
    }


def edit_all(completions: list[str], human: list[str], rng: random.Random) -> dict[str, list[str]]:
    """The same edits of completions from elsewhere (a served model's): replacement words and hosts from `human`."""
    vocab = [w for t in human[:50] for w in t.split()]
    hosts = [human[rng.randrange(len(human))] for _ in completions]
    return _edits(completions, vocab, hosts, rng)


def repeating_cases(domain: str, n_completions: int, n_human: int, seed: int = 0, variants: int = 3) -> EchoCases:
    """A served model that repeats itself, as the demo's small Llama does: each short completion (50 to 150 words) is
    followed in the index by `variants` near-copies (30% of the words replaced), so most of its sampled shingles name
    a later copy. `edited` holds the quarter-rewrite (`rewrite25`) of each first completion, in order."""
    cases = echo_cases(domain, n_completions, n_human, seed=seed, words=(50, 150))
    rng = random.Random(seed)
    vocab = [w for h in cases.human[:50] for w in h.split()]
    completions = [v for c in cases.completions for v in [c, *(_replace(c, rng, vocab, 0.3) for _ in range(variants))]]
    rewrites = [_shuffle_sentences(_replace(c, rng, vocab, 0.25), rng) for c in cases.completions]
    return EchoCases(completions, {"rewrite25": rewrites}, cases.human)
