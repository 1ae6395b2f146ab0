"""Model-rated document quality: the criteria, the domains, and which rater scores a round's candidate pool.

Perplexity alone misjudges documents both ways (shuffled sentences read as
fluent; dense technical prose reads as noise). DataMan (Peng et al., 2025)
derives quality criteria from the causes of perplexity anomalies, rates each
document pointwise on every criterion and an overall score, and selects by the
overall score; a rater trained on those ratings beat uniform sampling of 50%
more data. This module is the contract every rater backend keeps:

* **Schema.** DataMan's 14 criteria (13 and the overall score) and 15 domains
  by default; a policy may name its own criteria and domains. Ratings are on a
  1..`scale` scale; `overall` is one of them.
* **Backends** (`backend`): `llm_judge`, an OpenAI-compatible endpoint asked
  for a JSON object per document (vLLM's guided decoding keeps it well-formed);
  `classifier`, a Hugging Face sequence-classification or regression model;
  `head`, a small head on the served model's own hidden states trained by
  `cptd rater-train` from pointwise ratings. The last two run as jobs on the
  trainer's device.
* **A rater that fails does not fail the round** (`on_error`): the round goes
  on with what was rated; unrated documents join after the rated ones
  (`unrated`) or wait in the buffer (`wait`). The record says how many were
  rated and why the others were not.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from policies.base import Section

OVERALL = "overall"

# DataMan's quality criteria (its 14: thirteen and the overall score), in the paper's order.
DATAMAN_CRITERIA: tuple[str, ...] = (
    "accuracy",
    "coherence",
    "language_consistency",
    "semantic_density",
    "knowledge_novelty",
    "topic_focus",
    "creativity",
    "professionalism",
    "style_consistency",
    "grammatical_diversity",
    "structural_standardization",
    "originality",
    "sensitivity",
    OVERALL,
)

# DataMan's application domains.
DATAMAN_DOMAINS: tuple[str, ...] = (
    "medicine",
    "finance",
    "law",
    "education",
    "technology",
    "entertainment",
    "mathematics",
    "coding",
    "government",
    "culture",
    "transportation",
    "retail_ecommerce",
    "telecommunication",
    "agriculture",
    "other",
)

RaterBackend = Literal["off", "llm_judge", "classifier", "head"]

# Why a document has no rating (the record counts them; `on_error` decides where they go).
UNRATED_TIMEOUT = "timeout"  # the judge did not answer within timeout_s
UNRATED_INVALID = "invalid_output"  # not a JSON object with every criterion and a known domain
UNRATED_RANGE = "out_of_range"  # a rating outside 1..scale
UNRATED_FAILED = "request_failed"  # the judge answered with an error, or could not be reached
UNRATED_JOB = "job_failed"  # the rating job failed: nobody rated the pool
UNRATED_MISSING = "not_rated"  # the backend returned no row for the document
UNRATED_ROW = "rater_error"  # the rating job reported an error for the document
UNRATED_ABANDONED = "abandoned"  # not asked: the judge failed every request for a while, the rest were given up
UNRATED_SKIPPED = "skipped"  # the rater could not be used at all (the reason is in the record's error)

# DataMan's pointwise prompt, shortened: every criterion on one scale, then the domain, as one JSON object.
DEFAULT_PROMPT = (
    "Rate the text below as pre-training data. Give each criterion an integer from 1 (worst) to {scale} (best), "
    "then name the text's domain.\nCriteria: {criteria}.\nDomains: {domains}.\n"
    "Answer with one JSON object: {example}\n\nText:\n<<<\n{text}\n>>>\nJSON: "
)


class RaterPolicy(Section):
    backend: RaterBackend = Field(
        default="off",
        description="who rates the candidate pool at SNAPSHOT: an LLM judge endpoint, a classifier model, or a head on the served model",
    )
    criteria: list[str] = Field(
        default_factory=lambda: list(DATAMAN_CRITERIA), description="criteria rated per document; must include 'overall'"
    )
    domains: list[str] = Field(default_factory=lambda: list(DATAMAN_DOMAINS), description="domains a rater may assign")
    scale: int = Field(default=5, ge=2, le=10, description="ratings are integers or reals from 1 to this")
    on_error: Literal["unrated", "wait"] = Field(
        default="unrated",
        description="documents the rater could not rate (timeout, invalid output, not reached): join after the rated ones, or wait",
    )
    # llm_judge
    url: str | None = Field(default=None, description="llm_judge: base URL of an OpenAI-compatible server (not the served replicas)")
    model: str | None = Field(default=None, description="llm_judge: model name on that server")
    allow_served_replicas: bool = Field(default=False, description="llm_judge: allow url to be one of the served replicas")
    concurrency: int = Field(default=4, ge=1, le=256, description="llm_judge: requests in flight")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="llm_judge: seconds per request")
    guided: bool = Field(default=True, description="llm_judge: guide the answer to the compact JSON object (vLLM structured outputs)")
    max_doc_chars: int = Field(default=6000, ge=100, le=200_000, description="characters of a document shown to the rater")
    max_tokens: int = Field(default=256, ge=16, le=8192, description="llm_judge: most tokens of one answer")
    prompt: str | None = Field(
        default=None,
        description="llm_judge: prompt template with {text}, {criteria}, {domains}, {scale}, {example} (null: DataMan-style default)",
    )
    # classifier / head
    path: str | None = Field(
        default=None,
        description="classifier: the model directory; head: the head directory (default: rater/ next to the served checkpoint)",
    )
    max_doc_tokens: int = Field(default=512, ge=16, le=131_072, description="classifier/head: tokens of a document read")

    @model_validator(mode="after")
    def _consistent(self) -> RaterPolicy:
        if OVERALL not in self.criteria:
            raise ValueError(f"curation.rater.criteria must include '{OVERALL}' (selection uses it)")
        if len(set(self.criteria)) != len(self.criteria) or len(set(self.domains)) != len(self.domains):
            raise ValueError("curation.rater.criteria and domains must not repeat a name")
        if self.backend == "llm_judge" and not (self.url and self.model):
            raise ValueError("curation.rater.backend: llm_judge needs curation.rater.url and curation.rater.model")
        if self.backend == "classifier" and not self.path:
            raise ValueError("curation.rater.backend: classifier needs curation.rater.path (the model directory)")
        if self.prompt is not None:
            if "{text}" not in self.prompt:
                raise ValueError("curation.rater.prompt must contain {text}")
            try:
                self.prompt.format(text="", criteria="", domains="", scale=0, example="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"curation.rater.prompt: not a template of {{text}}, {{criteria}}, {{domains}}, {{scale}}, {{example}}: {e}"
                ) from None
        return self


class Rating(BaseModel):
    """One document's rating, as every backend returns it (and the rating job writes, one row per document)."""

    overall: float  # 1..scale
    criteria: dict[str, float] = Field(default_factory=dict)  # criterion -> 1..scale (overall included)
    domain: str | None = None  # one of the policy's domains


# Escaped in a literal: only the metacharacters. re.escape also escapes spaces, '&', '-', '#' and '~', and those escapes
# need not be accepted by the regex dialect of the server's grammar backend (xgrammar, guidance), which reads the pattern.
_REGEX_SPECIAL = set("\\.^$|?*+()[]{}")


def _literal(text: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)


def answer_pattern(rater: RaterPolicy) -> str:
    """The one shape a guided judge's answer may take, as a regular expression (vLLM's structured outputs `regex`):
    the compact JSON object `{"<criterion>":<1..scale>,...,"domain":"<one of the policy's>"}`.

    A regex rather than a JSON schema: a schema's grammar allows whitespace between tokens, and vLLM 0.32 reads the
    switch that forbids it per server (`--structured-outputs-config.disable_any_whitespace`), not per request, so a
    weak judge pads the object with whitespace until max_tokens cuts it short. Here every character is fixed but the
    digits and the domain: the answer is a few tokens per criterion on any vLLM server, whatever its flags."""
    digits = "(" + "|".join(str(i) for i in range(rater.scale, 0, -1)) + ")"
    fields = [_literal(json.dumps(c, ensure_ascii=False)) + ":" + digits for c in rater.criteria]
    domains = "(" + "|".join(_literal(json.dumps(d, ensure_ascii=False)) for d in rater.domains) + ")"
    return "\\{" + ",".join([*fields, '"domain":' + domains]) + "\\}"


def judge_prompt(rater: RaterPolicy, text: str) -> str:
    """The prompt for one document: the policy's template (or DataMan-style default), the text cut to max_doc_chars."""
    example = json.dumps({**{c: rater.scale for c in rater.criteria}, "domain": rater.domains[0]})
    return (rater.prompt or DEFAULT_PROMPT).format(
        text=text[: rater.max_doc_chars],
        criteria=", ".join(rater.criteria),
        domains=", ".join(rater.domains),
        scale=rater.scale,
        example=example,
    )


_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def parse_answer(raw: Any, rater: RaterPolicy) -> Rating | str:
    """A judge's answer (its text, or a decoded row) as a Rating, or the reason it is none (UNRATED_INVALID, UNRATED_RANGE).

    Without guided decoding a model may wrap the object in prose: the first {...} that parses is taken. Every
    criterion must be present and within 1..scale; the domain must be one of the policy's."""
    obj = raw
    if isinstance(raw, str):
        obj = None
        for m in [raw.strip(), *(m.group(0) for m in _OBJECT.finditer(raw))]:
            try:
                obj = json.loads(m)
                break
            except ValueError:
                continue
    if not isinstance(obj, dict):
        return UNRATED_INVALID
    values: dict[str, float] = {}
    for c in rater.criteria:
        v = obj.get(c)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return UNRATED_INVALID
        if not 1 <= v <= rater.scale:
            return UNRATED_RANGE
        values[c] = float(v)
    domain = obj.get("domain")
    if domain is not None and domain not in rater.domains:
        return UNRATED_INVALID
    return Rating(overall=values[OVERALL], criteria=values, domain=domain)
