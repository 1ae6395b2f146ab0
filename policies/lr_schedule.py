"""Learning-rate schedules for continual pre-training rounds: pure functions step -> LR.

Three families (evidence and defaults in docs/round-engine.md):

* `rewarm_cosine` — every round re-warms linearly to a peak and re-decays by a
  cosine to a floor (Ibrahim et al. 2024, arXiv 2403.08763; Gupta et al. 2023).
  Simple, but each round pays the re-warming forgetting again.
* `infinite` — warm up once, cool down to a constant LR and stay there on a
  *main line* that carries its weights and optimizer state from round to round;
  every release is a short anneal *branch* off the main line (Ibrahim et al.
  2024 §7; Singh et al. 2025, arXiv 2503.02844). No re-warming, ever.
* `wsd` — warmup-stable-decay within one round (Hu et al. 2024, MiniCPM,
  arXiv 2404.06395), and `constant`.

Steps are 0-based; the LR returned for step `s` is the one used for the
optimizer update of step `s`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from policies.base import Section

Decay = Literal["linear", "cosine", "1-sqrt"]


def _warm(step: int, warmup_steps: int, peak: float) -> float:
    # (step + 1) so that step 0 already takes a small positive step instead of a wasted zero-LR update.
    return peak * (step + 1) / warmup_steps


def decay_shape(frac: float, kind: str) -> float:
    """Multiplier going from 1 at frac=0 to 0 at frac=1 along the named curve."""
    frac = min(max(frac, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - frac
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "1-sqrt":  # Hägele et al. 2024: 1-sqrt cooldown matches cosine at a fraction of the steps
        return 1.0 - math.sqrt(frac)
    raise ValueError(f"unknown decay shape {kind!r}")


def constant(step: int, peak: float, warmup_steps: int = 0) -> float:
    if step < warmup_steps:
        return _warm(step, warmup_steps, peak)
    return peak


def rewarm_cosine(step: int, total_steps: int, peak: float, floor: float | None = None, warmup_frac: float = 0.01) -> float:
    """Linear re-warm over `warmup_frac` of the round to `peak`, cosine to `floor` (default 0.1 x peak) at the last step."""
    floor = 0.1 * peak if floor is None else floor
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return _warm(step, warmup, peak)
    span = max(1, total_steps - 1 - warmup)
    return floor + (peak - floor) * decay_shape((step - warmup) / span, "cosine")


def wsd(
    step: int,
    total_steps: int,
    peak: float,
    warmup_frac: float = 0.01,
    decay_frac: float = 0.2,
    decay: Decay = "1-sqrt",
    floor: float = 0.0,
) -> float:
    """Warmup, stable at `peak`, then decay over the last `decay_frac` of the round to `floor`."""
    warmup = max(1, round(warmup_frac * total_steps))
    decay_steps = max(1, round(decay_frac * total_steps))
    decay_start = total_steps - decay_steps
    if step < warmup and step < decay_start:
        return _warm(step, warmup, peak)
    if step < decay_start:
        return peak
    return floor + (peak - floor) * decay_shape((step - decay_start + 1) / decay_steps, decay)


def infinite_main(
    step: int,
    warmup_steps: int,
    cooldown_steps: int,
    eta_max: float,
    eta_const: float,
    cooldown: Literal["cosine", "inv_sqrt"] = "cosine",
    timescale: float = 10.0,
) -> float:
    """The main line of the infinite schedule at *global* step `step` (counted across rounds).

    warmup to eta_max, cool down to eta_const, then constant forever. The
    inverse-sqrt cooldown is Ibrahim et al.'s: eta_max + (eta_const - eta_max) * h(x) / h(1)
    with h(x) = 1/sqrt(1 + timescale*x) - 1, x the fraction of the cooldown done.
    """
    if step < warmup_steps:
        return _warm(step, warmup_steps, eta_max)
    t = step - warmup_steps
    if t >= cooldown_steps:
        return eta_const
    x = t / cooldown_steps
    if cooldown == "cosine":
        return eta_const + (eta_max - eta_const) * decay_shape(x, "cosine")
    if cooldown == "inv_sqrt":
        h = lambda v: 1.0 / math.sqrt(1.0 + timescale * v) - 1.0  # noqa: E731
        return eta_max + (eta_const - eta_max) * h(x) / h(1.0)
    raise ValueError(f"unknown cooldown {cooldown!r}")


def anneal(
    step: int, anneal_steps: int, eta_start: float, eta_min: float, kind: Literal["exp", "1-sqrt", "linear", "cosine"] = "1-sqrt"
) -> float:
    """The release branch: from eta_start down to eta_min at the branch's last step (`step` counts within the branch)."""
    frac = (step + 1) / max(1, anneal_steps)
    if kind == "exp":
        return eta_start * (eta_min / eta_start) ** min(frac, 1.0)
    return eta_min + (eta_start - eta_min) * decay_shape(frac, kind)


def infinite(
    step: int,
    warmup_steps: int,
    cooldown_steps: int,
    eta_max: float,
    eta_const: float,
    eta_min: float,
    anneal_start: int,
    anneal_steps: int,
    cooldown: Literal["cosine", "inv_sqrt"] = "cosine",
    timescale: float = 10.0,
    anneal_kind: Literal["exp", "1-sqrt", "linear", "cosine"] = "exp",
) -> float:
    """The whole single-run infinite schedule: main line until `anneal_start`, then the anneal to eta_min."""
    if step < anneal_start:
        return infinite_main(step, warmup_steps, cooldown_steps, eta_max, eta_const, cooldown, timescale)
    start_lr = infinite_main(anneal_start, warmup_steps, cooldown_steps, eta_max, eta_const, cooldown, timescale)
    return anneal(step - anneal_start, anneal_steps, start_lr, eta_min, anneal_kind)


class SchedulePolicy(Section):
    """How a round's learning rate moves. `peak_lr` and `warmup_frac` are the drift-adjustable knobs."""

    kind: Literal["rewarm_cosine", "infinite", "wsd", "constant"] = Field(default="rewarm_cosine")
    peak_lr: float = Field(
        default=3e-4, gt=0, le=1e-1, description="re-warm height (rewarm_cosine/wsd/constant); drift may move it within drift.peak_lr_*"
    )
    floor_frac: float = Field(default=0.1, ge=0, le=1, description="rewarm_cosine/wsd: final LR as a fraction of peak_lr")
    warmup_frac: float = Field(
        default=0.01, ge=0, le=0.5, description="rewarm_cosine/wsd/constant: re-warm length as a fraction of the round's steps"
    )
    decay_frac: float = Field(default=0.2, gt=0, le=1, description="wsd: decay length as a fraction of the round")
    decay: Decay = Field(default="1-sqrt", description="wsd decay shape")
    # infinite: the main line (global steps, counted across rounds)
    eta_max: float = Field(default=3e-4, gt=0, le=1e-1, description="infinite: LR after the one-time warmup")
    eta_const: float = Field(default=1.5e-4, gt=0, le=1e-1, description="infinite: constant LR of the main line")
    eta_min: float = Field(default=3e-5, ge=0, le=1e-1, description="infinite: LR at the end of every anneal branch")
    warmup_steps: int = Field(default=100, ge=1, le=10_000_000, description="infinite: one-time warmup, global steps")
    cooldown_steps: int = Field(default=1000, ge=0, le=100_000_000, description="infinite: eta_max -> eta_const, global steps")
    cooldown: Literal["cosine", "inv_sqrt"] = Field(default="cosine")
    timescale: float = Field(default=10.0, gt=0, le=1000, description="infinite inv_sqrt cooldown timescale (alpha)")
    anneal_frac: float = Field(
        default=0.15, ge=0.01, le=0.5, description="infinite: anneal branch length as a fraction of the round's main-line steps"
    )
    anneal: Literal["exp", "1-sqrt", "linear", "cosine"] = Field(default="1-sqrt", description="infinite: anneal branch shape")

    @model_validator(mode="after")
    def _ordered(self) -> SchedulePolicy:
        if not self.eta_min <= self.eta_const <= self.eta_max:
            raise ValueError("schedule: need eta_min <= eta_const <= eta_max")
        return self


def anneal_steps_for(policy: SchedulePolicy, main_steps: int) -> int:
    """Length of an infinite round's anneal branch; 0 for the other kinds."""
    return max(1, round(policy.anneal_frac * main_steps)) if policy.kind == "infinite" else 0


def round_lr(policy: SchedulePolicy, step: int, main_steps: int, global_step0: int = 0) -> tuple[float, str]:
    """LR and phase name for round-local `step` of a round with `main_steps` main-line steps.

    For `infinite`, steps [0, main_steps) are main-line steps at global position
    global_step0 + step and steps [main_steps, main_steps + anneal) are the anneal
    branch; every other kind is one plain run of `main_steps` steps.
    """
    p = policy
    if p.kind == "infinite":
        if step < main_steps:
            g = global_step0 + step
            return infinite_main(g, p.warmup_steps, p.cooldown_steps, p.eta_max, p.eta_const, p.cooldown, p.timescale), "main"
        g_end = global_step0 + main_steps
        start = infinite_main(g_end, p.warmup_steps, p.cooldown_steps, p.eta_max, p.eta_const, p.cooldown, p.timescale)
        return anneal(step - main_steps, anneal_steps_for(p, main_steps), start, p.eta_min, p.anneal), "anneal"
    if p.kind == "rewarm_cosine":
        return rewarm_cosine(step, main_steps, p.peak_lr, p.floor_frac * p.peak_lr, p.warmup_frac), "main"
    if p.kind == "wsd":
        return wsd(step, main_steps, p.peak_lr, p.warmup_frac, p.decay_frac, p.decay, p.floor_frac * p.peak_lr), "main"
    return constant(step, p.peak_lr, round(p.warmup_frac * main_steps)), "main"
