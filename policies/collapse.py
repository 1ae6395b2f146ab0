"""The guard against training on the model's own output (model collapse).

Retraining on one's own generations degrades a model (Shumailov et al., 2024);
keeping a share of real data in every round keeps the loop stable (Bertrand et
al., 2023), and accumulating data works where replacing it does not
(Gerstgrasser et al., 2024). So cptd:

* indexes the served model's outputs (`echo_topics`, a topic of completions the
  serving side publishes) with MinHash/LSH and calls an incoming document that
  near-duplicates one of them an `echo`: dead-lettered, or kept and counted as
  synthetic (`echo_action`). The echo index uses shorter shingles and a lower
  LSH threshold than ingest dedup (word 3-grams, 20 bands of 3 rows: Jaccard
  ~0.37, against 5-grams at ~0.72), because light paraphrases of a generation
  must still match while a human text rarely shares a third of its word
  trigrams with one. Measured on 75 generations of a small pre-trained Llama and
  400 human documents (docs/ingest.md, Echoes): exact copies 100%, 5% of words
  replaced or dropped 100%, 10% 95%; ingest's own 5-gram index caught 21% at 5%;
  no human document matched. Resemblance misses what differs in length from the
  completion (a cut, a completion embedded in a longer page, a heavy rewrite), so
  the index also matches by containment (`echo_containment` and the knobs after
  it; policies/echo_containment.py): the share of a completion found in the
  document, and of a window of the document found in a completion, from a hash-
  chosen sample of their shingles. Defaults chosen on bench/echo_recall.py's sets:
  a quarter of the words rewritten and sentences reordered 96-97% caught
  (resemblance alone 26-27%), the first half 100% (94-97%), a third of a human
  document 100% (49-52%), no human document of the same domain flagged (0/2,000).
  Short texts are also sampled densely (`echo_dense_words`), and what a document
  shares with a candidate is counted from the candidate's entry: on the demo
  model's own 93-word completions the rewrite is caught 95.8% (before: 59.3%),
  0/1,000 human documents flagged;
* caps the synthetic share (labelled, echoes, or flagged by the detector) of a
  round's new tokens, and keeps real data (human + unknown new, plus replay)
  above a floor;
* lets only human and unknown documents into the replay reservoir by default,
  so the real data accumulates;
* records each round's shares, and counts the rounds in a row in which the cap
  bound (a metric and an alert fire on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from policies.base import Section
from policies.dedup import DedupPolicy
from policies.provenance import PROVENANCE_CLASSES

ECHO = "echo"  # reason code of a dead-lettered echo, and provenance rule of a kept one


class CollapsePolicy(Section):
    echo_topics: list[str] = Field(
        default_factory=list,
        description="Kafka topics of the served model's completions (same message format as documents); indexed, never trained on",
    )
    echo_action: Literal["dead_letter", "mark_synthetic"] = Field(
        default="mark_synthetic",
        description="an incoming document that near-duplicates an indexed completion: dead-lettered (reason echo), or kept as synthetic",
    )
    echo_ngram_size: int = Field(default=3, ge=1, le=16, description="words per shingle of the echo index")
    echo_bands: int = Field(default=20, ge=1, le=64, description="LSH bands of the echo index")
    echo_rows_per_band: int = Field(default=3, ge=1, le=32, description="rows per band; threshold ~ (1/bands)**(1/rows) = 0.37 at 20x3")
    echo_max_docs: int = Field(default=200_000, ge=1, description="completions kept in the echo index (oldest evicted)")
    echo_containment: bool = Field(
        default=True,
        description="also match by containment (policies/echo_containment.py): a completion cut, embedded in a longer "
        "document or partly rewritten shares too few shingles overall for the LSH bands, but most of its own or of a "
        "stretch of the document",
    )
    echo_sample_every: int = Field(
        default=4, ge=1, le=64, description="1 in this many shingles (by hash value) is indexed and looked up for containment"
    )
    echo_max_shingles: int = Field(
        default=256, ge=8, le=4096, description="most sampled shingles indexed per completion (the smallest hashes of a longer one)"
    )
    echo_min_shared: int = Field(
        default=6, ge=1, description="least distinct sampled shingles a document must share with one completion to echo it by containment"
    )
    echo_completion_share: float = Field(
        default=0.2, gt=0, le=1, description="echo when this share of a completion's sampled shingles is in the document"
    )
    echo_window: int = Field(
        default=24, ge=4, le=1024, description="sampled shingles per window of the document (24 at 1 in 4: about 100 words)"
    )
    echo_window_share: float = Field(
        default=0.25, gt=0, le=1, description="echo when this share of one window of the document is in one completion"
    )
    echo_candidates: int = Field(
        default=3,
        ge=1,
        le=64,
        description="completions per document, named by the most of its sample keys, whose index entries are read to count "
        "what each shares with it (a key several completions share names only the latest)",
    )
    echo_candidate_hits: int = Field(
        default=3, ge=1, description="least distinct sample keys of a document that must name a completion for it to be a candidate"
    )
    echo_dense_words: int = Field(
        default=200,
        ge=0,
        description="completions and documents of at most this many words are also sampled 1 in echo_dense_sample_every "
        "(a short completion rewritten keeps too few of its 1-in-echo_sample_every shingles); 0: off",
    )
    echo_dense_sample_every: int = Field(
        default=1, ge=1, le=64, description="1 in this many shingles (by hash value) of a short text is indexed and looked up"
    )
    echo_dense_min_shared: int = Field(
        default=12, ge=1, description="least distinct shingles of both samples a short document must share with a short completion"
    )
    synthetic_cap: float = Field(
        default=0.15, ge=0, le=1, description="most share of a round's new tokens that may be synthetic or suspected (10-20% is safe)"
    )
    real_floor: float = Field(
        default=0.5, ge=0, le=1, description="least share of a round's tokens (new + replay) that must be real: human or unknown"
    )
    replay_admits: list[str] = Field(
        default=["human", "unknown"], description="provenance classes the replay reservoir accepts (real data accumulates)"
    )
    detector: bool = Field(
        default=False,
        description="score each candidate of a round for machine generation (Binoculars: NLL under the served model / "
        "cross-entropy served -> original base; two forward passes per document on the trainer's device) and record it",
    )
    detector_threshold: float | None = Field(
        default=None,
        gt=0,
        description="documents whose detector score is below this are suspected machine-generated and count against the cap "
        "(calibrate per deployment: `cptd calibrate-detector`); unset: scores are recorded, nothing is flagged",
    )
    cap_alert_rounds: int = Field(default=3, ge=1, le=100, description="the cap binding this many rounds in a row raises the alert")

    @model_validator(mode="after")
    def _classes(self) -> CollapsePolicy:
        bad = [c for c in self.replay_admits if c not in PROVENANCE_CLASSES]
        if bad:
            raise ValueError(f"replay_admits: unknown provenance classes {bad} (allowed: {list(PROVENANCE_CLASSES)})")
        if self.echo_sample_every % self.echo_dense_sample_every:
            raise ValueError("echo_dense_sample_every must divide echo_sample_every (the dense sample holds the sparse one)")
        return self

    @property
    def effective_cap(self) -> float:
        """The synthetic share of new tokens allowed by both the cap and the real-data floor (replay is always real)."""
        return min(self.synthetic_cap, 1.0 - self.real_floor)


def echo_dedup_policy(policy: CollapsePolicy) -> DedupPolicy:
    """The MinHash/LSH parameters of the echo index, as a DedupPolicy for policies.dedup's kernels."""
    return DedupPolicy(ngram_size=policy.echo_ngram_size, bands=policy.echo_bands, rows_per_band=policy.echo_rows_per_band, seed=7)


def real_share(replay_ratio: float | None, synthetic_share: float) -> float:
    """Real (human + unknown) share of a round's training tokens: new documents less their synthetic share, plus
    replay, which admits real documents only (collapse.replay_admits). Compared with `real_floor`."""
    r = replay_ratio or 0.0
    return (1 - r) * (1 - synthetic_share) + r


def cap_binding_streak(previous: int, binding: bool) -> int:
    """Rounds in a row in which the synthetic cap bound, this one included (the alert's count)."""
    return previous + 1 if binding else 0


def suspected(score: float | None, policy: CollapsePolicy) -> bool:
    """Whether the detector flags a document: less surprising to the served model than the models expect."""
    return policy.detector_threshold is not None and score is not None and score < policy.detector_threshold


@dataclass(frozen=True)
class Calibration:
    threshold: float  # flag documents scoring below this
    human_flagged: float  # share of the human sample below the threshold (false positives)
    generated_caught: float  # share of the generated sample below it (true positives)
    human_docs: int
    generated_docs: int


def calibrate(human: Sequence[float], generated: Sequence[float], max_false_positive: float = 0.01) -> Calibration:
    """The highest threshold that flags at most `max_false_positive` of the human sample, and what it catches."""
    if not human or not generated:
        raise ValueError("calibration needs scores of both human and generated documents")
    hs = sorted(human)
    threshold = hs[min(int(max_false_positive * len(hs)), len(hs) - 1)]
    return Calibration(
        threshold=threshold,
        human_flagged=sum(h < threshold for h in hs) / len(hs),
        generated_caught=sum(g < threshold for g in generated) / len(generated),
        human_docs=len(hs),
        generated_docs=len(generated),
    )
