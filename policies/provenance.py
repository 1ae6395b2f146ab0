"""Where a document comes from: its source, its domain and its provenance class (human, unknown, synthetic).

Why: a deployed model's outputs flow back into the web and into our topics, and
a model retrained on its own outputs degrades (model collapse: Shumailov et al.
2024). The guard against it (policies/collapse.py) needs to know, for every
buffered document, whether a person wrote it, a generator did, or nobody says.
The answer comes from the message (`meta.generator`, `meta.synthetic`,
`meta.domain`) and from the operator's rules about sources, in that order of
trust: a producer that labels its own output synthetic is believed, a source
the operator lists as synthetic is synthetic whatever the message says, and
only a source the operator lists as human makes a document human. A message
cannot make itself human: `meta.synthetic: false` leaves it `unknown`.

Domains come from `meta.domain`, else from source rules, else from a small
multinomial naive Bayes classifier trained at policy load on the labelled
examples in the policy file (nothing is downloaded; a few dozen examples per
domain are enough to route documents of distinct vocabularies). Naive Bayes
over word counts is twenty lines here, where a library would add a dependency
to the ingest hot path for the same arithmetic.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from policies.base import Section

ProvenanceClass = Literal["human", "unknown", "synthetic"]
PROVENANCE_CLASSES: tuple[str, ...] = ("human", "unknown", "synthetic")
UNKNOWN_DOMAIN = "unknown"

# Reason codes of the rejections decided here (one rule, one reason, like policies/quality.py).
SOURCE_DENIED = "source_denied"
SOURCE_NOT_ALLOWED = "source_not_allowed"

_WORD = re.compile(r"\w+", re.UNICODE)


class DomainClassifierPolicy(Section):
    examples: dict[str, list[str]] = Field(
        default_factory=dict,
        description="labelled example texts per domain; a document without meta.domain and without a source rule is classified "
        "by a naive Bayes model trained on them at load (empty: such documents get domain 'unknown')",
    )
    min_confidence: float = Field(default=0.6, ge=0, le=1, description="below this posterior the domain is 'unknown'")

    @field_validator("examples")
    @classmethod
    def _two_domains(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if v and (len(v) < 2 or any(not xs for xs in v.values())):
            raise ValueError("needs at least two domains, each with at least one example text")
        return v


class ProvenancePolicy(Section):
    human_sources: list[str] = Field(default_factory=list, description="source patterns (fnmatch, e.g. 'newsroom/*') written by people")
    synthetic_sources: list[str] = Field(
        default_factory=list, description="source patterns known to carry machine-generated text: always synthetic"
    )
    allowed_sources: list[str] = Field(
        default_factory=list, description="non-empty: only documents whose source matches one are accepted (others: source_not_allowed)"
    )
    denied_sources: list[str] = Field(default_factory=list, description="documents whose source matches one are rejected (source_denied)")
    trust_generator_field: bool = Field(
        default=True, description="a message with meta.generator (non-empty) or meta.synthetic: true is synthetic"
    )
    domain_sources: dict[str, list[str]] = Field(
        default_factory=dict, description="domain -> source patterns, for messages without meta.domain"
    )
    classifier: DomainClassifierPolicy = DomainClassifierPolicy()

    @model_validator(mode="after")
    def _not_both(self) -> ProvenancePolicy:
        both = set(self.human_sources) & set(self.synthetic_sources)
        if both:
            raise ValueError(f"patterns listed as both human and synthetic: {sorted(both)}")
        return self

    @cached_property
    def domain_model(self) -> NaiveBayes | None:
        ex = self.classifier.examples
        return NaiveBayes.fit(ex) if ex else None


@dataclass(frozen=True)
class Provenance:
    source: str | None
    domain: str
    cls: str  # one of PROVENANCE_CLASSES
    rule: str  # what decided the class: meta_generator, meta_synthetic, synthetic_source, human_source, echo, none
    domain_rule: str  # meta, source, classifier, none

    def to_record(self) -> dict[str, Any]:
        return {"provenance": self.cls, "provenance_rule": self.rule, "domain": self.domain, "domain_rule": self.domain_rule}


def _matches(source: str | None, patterns: Sequence[str]) -> bool:
    return source is not None and any(fnmatchcase(source, p) for p in patterns)


def source_rejection(source: str | None, policy: ProvenancePolicy) -> str | None:
    """The reason code when the operator's source rules refuse this document, else None."""
    if _matches(source, policy.denied_sources):
        return SOURCE_DENIED
    if policy.allowed_sources and not _matches(source, policy.allowed_sources):
        return SOURCE_NOT_ALLOWED
    return None


def classify(text: str, source: str | None, meta: Mapping[str, Any], policy: ProvenancePolicy) -> Provenance:
    """Provenance class and domain of one accepted document."""
    cls, rule = "unknown", "none"
    gen = meta.get("generator")
    if _matches(source, policy.synthetic_sources):
        cls, rule = "synthetic", "synthetic_source"
    elif policy.trust_generator_field and isinstance(gen, str) and gen.strip():
        cls, rule = "synthetic", "meta_generator"
    elif policy.trust_generator_field and meta.get("synthetic") is True:
        cls, rule = "synthetic", "meta_synthetic"
    elif _matches(source, policy.human_sources):
        cls, rule = "human", "human_source"
    domain, domain_rule = _domain(text, source, meta, policy)
    return Provenance(source, domain, cls, rule, domain_rule)


def _domain(text: str, source: str | None, meta: Mapping[str, Any], policy: ProvenancePolicy) -> tuple[str, str]:
    d = meta.get("domain")
    if isinstance(d, str) and d.strip():
        return d.strip().lower(), "meta"
    for domain, patterns in policy.domain_sources.items():
        if _matches(source, patterns):
            return domain, "source"
    model = policy.domain_model
    if model is not None:
        label, p = model.predict(text)
        if p >= policy.classifier.min_confidence:
            return label, "classifier"
    return UNKNOWN_DOMAIN, "none"


def words(text: str, limit: int = 2000) -> list[str]:
    """Lower-cased word tokens of the first `limit` words (the classifier's features)."""
    out = []
    for m in _WORD.finditer(text.lower()):
        out.append(m.group())
        if len(out) >= limit:
            break
    return out


@dataclass(frozen=True)
class NaiveBayes:
    """Multinomial naive Bayes over word counts, Laplace-smoothed."""

    log_prior: dict[str, float]
    log_word: dict[str, dict[str, float]]
    log_unseen: dict[str, float]

    @classmethod
    def fit(cls, examples: Mapping[str, Sequence[str]]) -> NaiveBayes:
        counts = {label: Counter(w for t in texts for w in words(t)) for label, texts in examples.items()}
        vocab = set().union(*counts.values())
        n_docs = sum(len(t) for t in examples.values())
        log_prior = {label: math.log(len(texts) / n_docs) for label, texts in examples.items()}
        log_word, log_unseen = {}, {}
        for label, c in counts.items():
            denom = sum(c.values()) + len(vocab) + 1
            log_word[label] = {w: math.log((n + 1) / denom) for w, n in c.items()}
            log_unseen[label] = math.log(1 / denom)
        return cls(log_prior, log_word, log_unseen)

    def predict(self, text: str) -> tuple[str, float]:
        """(label, posterior) of the most likely label."""
        ws = words(text)
        scores = {label: lp + sum(self.log_word[label].get(w, self.log_unseen[label]) for w in ws) for label, lp in self.log_prior.items()}
        top = max(scores, key=scores.__getitem__)
        z = sum(math.exp(s - scores[top]) for s in scores.values())
        return top, 1.0 / z
