"""Drift of a round's new data against the replay/reference set -> replay ratio and peak LR.

The daemon measures two statistics (daemon/jobs/drift_probe.py on the trainer's device, or the served model through
vLLM: daemon/rounds/drift_measure.py):

* perplexity gap s = (L(new) - L(ref)) / L(ref), mean token NLL under the
  serving model. It asks the question that matters: how much does the model
  *not yet know* about the new data, compared to data it was trained for.
* unigram Jensen-Shannon distance of the token distributions (base 2, in
  [0, 1]). Model-free, so it still sees a shift in vocabulary when the model
  happens to predict both sets equally badly.
* tokenizer fertility ratio: tokens per character of the new data over that of
  the reference, read as max(r, 1/r). A new language or script under the served
  tokenizer shows up here at once (an English BPE spends several times more
  tokens per character on Vietnamese or Chinese), before any loss is compared.

Each statistic maps to a partial score (0 below its noise floor, 0.5 at its
"weak" threshold, 1 at its "strong" threshold, linear between); the drift score
is the largest of them, because either one alone is evidence of a shift.
The score then moves the replay ratio between the ReplayPolicy anchors and the
round's peak LR (the re-warm height) between DriftPolicy bounds: more drift,
more to learn (higher LR, Gupta et al. 2023) and more to forget (more replay,
Ibrahim et al. 2024). Evidence for each default is in docs/round-engine.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from pydantic import Field, model_validator

from policies.base import Section
from policies.lr_schedule import SchedulePolicy
from policies.replay import ReplayPolicy, interpolate_anchors, replay_ratio


class DriftPolicy(Section):
    ppl_gap_none: float = Field(default=0.02, ge=0, le=10, description="perplexity gap below this is noise (score 0)")
    ppl_gap_weak: float = Field(default=0.10, gt=0, le=10, description="perplexity gap scored 0.5 (weak shift)")
    ppl_gap_strong: float = Field(default=0.50, gt=0, le=10, description="perplexity gap scored 1 (strong shift)")
    js_none: float = Field(default=0.05, ge=0, le=1, description="unigram JS distance below this is noise (score 0)")
    js_weak: float = Field(default=0.15, gt=0, le=1, description="unigram JS distance scored 0.5")
    js_strong: float = Field(default=0.45, gt=0, le=1, description="unigram JS distance scored 1")
    fertility_none: float = Field(default=1.15, ge=1, le=100, description="fertility ratio (tokens/char, new vs ref) below this is noise")
    fertility_weak: float = Field(default=1.4, gt=1, le=100, description="fertility ratio scored 0.5")
    fertility_strong: float = Field(default=2.0, gt=1, le=100, description="fertility ratio scored 1 (another language or script)")
    peak_lr_min: float = Field(default=1.5e-4, gt=0, le=1e-1, description="peak LR at drift score 0")
    peak_lr_max: float = Field(default=3e-4, gt=0, le=1e-1, description="peak LR at drift score 1")
    warmup_frac_min: float = Field(default=0.01, ge=0, le=0.5, description="re-warm length (fraction of round) at score 0")
    warmup_frac_max: float = Field(default=0.01, ge=0, le=0.5, description="re-warm length at score 1")
    probe_docs: int = Field(default=256, ge=8, le=100_000, description="documents of each set the probe scores")
    probe_max_len: int = Field(default=512, ge=16, le=32_768, description="token window of the probe")

    @model_validator(mode="after")
    def _ordered(self) -> DriftPolicy:
        if not self.ppl_gap_none < self.ppl_gap_weak < self.ppl_gap_strong:
            raise ValueError("drift: need ppl_gap_none < ppl_gap_weak < ppl_gap_strong")
        if not self.js_none < self.js_weak < self.js_strong:
            raise ValueError("drift: need js_none < js_weak < js_strong")
        if not self.fertility_none < self.fertility_weak < self.fertility_strong:
            raise ValueError("drift: need fertility_none < fertility_weak < fertility_strong")
        if self.peak_lr_min > self.peak_lr_max:
            raise ValueError("drift: need peak_lr_min <= peak_lr_max")
        return self


@dataclass(frozen=True)
class DriftStats:
    loss_new: float  # mean token NLL of the new sample under the serving model
    loss_ref: float  # same for the reference (replay) sample
    js_distance: float
    tokens_new: int
    tokens_ref: int
    # Tokenizer fertility of the raw texts (no BOS, no windows); 0 = not measured.
    text_tokens_new: int = 0
    text_tokens_ref: int = 0
    chars_new: int = 0
    chars_ref: int = 0
    words_new: int = 0  # whitespace-separated
    words_ref: int = 0

    @property
    def ppl_gap(self) -> float:
        return (self.loss_new - self.loss_ref) / self.loss_ref

    @property
    def fertility_new(self) -> float | None:
        """Tokens per character of the new data."""
        return self.text_tokens_new / self.chars_new if self.chars_new else None

    @property
    def fertility_ref(self) -> float | None:
        return self.text_tokens_ref / self.chars_ref if self.chars_ref else None

    @property
    def fertility_ratio(self) -> float | None:
        """max(r, 1/r) of the two fertilities: 1 = the tokenizer fits both sets alike."""
        fn, fr = self.fertility_new, self.fertility_ref
        if not fn or not fr:
            return None
        return max(fn / fr, fr / fn)

    def derived(self) -> dict[str, float | None]:
        return {
            "ppl_gap": self.ppl_gap,
            "fertility_new": self.fertility_new,
            "fertility_ref": self.fertility_ref,
            "fertility_ratio": self.fertility_ratio,
            "tokens_per_word_new": self.text_tokens_new / self.words_new if self.words_new else None,
            "tokens_per_word_ref": self.text_tokens_ref / self.words_ref if self.words_ref else None,
        }


def probe_sample(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """A seeded sample, so a re-measured round gets the same statistics, by the job or through vLLM alike."""
    if len(texts) <= n:
        return list(texts)
    return random.Random(seed).sample(list(texts), n)


def measured_stats(
    losses: tuple[float, float],
    scored_tokens: tuple[int, int],
    counts: tuple[Mapping[int, int], Mapping[int, int]],
    new: Sequence[str],
    ref: Sequence[str],
) -> DriftStats:
    """The statistics of (new, ref): their mean token NLLs and scored tokens, their whole texts' token histograms
    (under the served tokenizer), however they were scored: the probe job's forward passes or vLLM's logprobs."""
    cn, cr = counts
    return DriftStats(
        loss_new=losses[0],
        loss_ref=losses[1],
        js_distance=js_distance(cn, cr),
        tokens_new=scored_tokens[0],
        tokens_ref=scored_tokens[1],
        text_tokens_new=sum(cn.values()),
        text_tokens_ref=sum(cr.values()),
        chars_new=sum(map(len, new)),
        chars_ref=sum(map(len, ref)),
        words_new=sum(len(t.split()) for t in new),
        words_ref=sum(len(t.split()) for t in ref),
    )


@dataclass(frozen=True)
class DriftDecision:
    """What a round stores: the measurement and the values chosen from it."""

    stats: DriftStats | None
    score: float | None
    level: str  # none | weak | strong | unmeasured
    replay_ratio: float
    peak_lr: float
    warmup_frac: float

    def to_record(self) -> dict:
        rec = asdict(self)
        if self.stats is not None:
            rec["stats"].update(self.stats.derived())
        return rec


def js_distance(p_counts: Mapping[int, int], q_counts: Mapping[int, int]) -> float:
    """Jensen-Shannon distance (sqrt of the divergence, log base 2) between two count histograms."""
    p_tot, q_tot = sum(p_counts.values()), sum(q_counts.values())
    if p_tot == 0 or q_tot == 0:
        raise ValueError("js_distance needs two non-empty histograms")
    div = 0.0
    for k in set(p_counts) | set(q_counts):
        p, q = p_counts.get(k, 0) / p_tot, q_counts.get(k, 0) / q_tot
        m = 0.5 * (p + q)
        if p > 0:
            div += 0.5 * p * math.log2(p / m)
        if q > 0:
            div += 0.5 * q * math.log2(q / m)
    return math.sqrt(max(div, 0.0))


def _partial(x: float, none: float, weak: float, strong: float) -> float:
    if x <= none:
        return 0.0
    if x <= weak:
        return 0.5 * (x - none) / (weak - none)
    return min(1.0, 0.5 + 0.5 * (x - weak) / (strong - weak))


def drift_score(stats: DriftStats, policy: DriftPolicy) -> float:
    fert = stats.fertility_ratio
    return max(
        _partial(stats.ppl_gap, policy.ppl_gap_none, policy.ppl_gap_weak, policy.ppl_gap_strong),
        _partial(stats.js_distance, policy.js_none, policy.js_weak, policy.js_strong),
        0.0 if fert is None else _partial(fert, policy.fertility_none, policy.fertility_weak, policy.fertility_strong),
    )


def adjust_for_drift(stats: DriftStats | None, policy: DriftPolicy, replay: ReplayPolicy) -> DriftDecision:
    """Drift -> (replay ratio, peak LR, re-warm length). No measurement counts as a weak shift."""
    score = None if stats is None else drift_score(stats, policy)
    s = 0.5 if score is None else score
    level = "unmeasured" if score is None else ("none" if s == 0 else "weak" if s <= 0.5 else "strong")
    return DriftDecision(
        stats=stats,
        score=score,
        level=level,
        replay_ratio=replay_ratio(replay, score),
        peak_lr=policy.peak_lr_min + (policy.peak_lr_max - policy.peak_lr_min) * s,
        warmup_frac=interpolate_anchors(
            s, policy.warmup_frac_min, 0.5 * (policy.warmup_frac_min + policy.warmup_frac_max), policy.warmup_frac_max
        ),
    )


def apply_to_schedule(schedule: SchedulePolicy, decision: DriftDecision) -> SchedulePolicy:
    """The round's schedule with the drift-chosen re-warm height and length.

    The infinite schedule never re-warms (its main line keeps eta_const across
    rounds), so there drift acts through replay only and the schedule is returned unchanged.
    """
    if schedule.kind == "infinite":
        return schedule
    return schedule.model_copy(update={"peak_lr": decision.peak_lr, "warmup_frac": decision.warmup_frac})
