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

from typing import Literal

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
    guided: bool = Field(default=True, description="llm_judge: ask for JSON-schema-guided output (vLLM structured outputs)")
    max_doc_chars: int = Field(default=6000, ge=100, le=200_000, description="characters of a document shown to the rater")
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
        return self


class Rating(BaseModel):
    """One document's rating, as every backend returns it (and the rating job writes, one row per document)."""

    overall: float  # 1..scale
    criteria: dict[str, float] = Field(default_factory=dict)  # criterion -> 1..scale (overall included)
    domain: str | None = None  # one of the policy's domains
