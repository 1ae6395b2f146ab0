"""The trainer's knobs as the operator sets them; the daemon copies them into each round's TrainSpec."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from policies.base import Section


class TrainPolicy(Section):
    mode: Literal["full", "lora"] = Field(default="full", description="full fine-tuning, or a LoRA adapter served by vLLM --enable-lora")
    micro_batch_size: int = Field(default=8, ge=1, le=4096, description="packed sequences per forward pass (per GPU)")
    seq_len: int = Field(default=2048, ge=16, le=131_072, description="tokens per packed sequence")
    grad_accum: int = Field(default=4, ge=1, le=4096, description="micro-batches per optimizer step")
    epochs: float = Field(default=1.0, gt=0, le=100, description="passes over the round's mixture")
    max_steps: int | None = Field(default=None, ge=1, le=100_000_000, description="cap on a round's main-line optimizer steps")
    grad_clip: float = Field(default=1.0, gt=0, le=1000, description="global gradient-norm clip")
    weight_decay: float = Field(default=0.1, ge=0, le=1)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    adam_eps: float = Field(default=1e-8, gt=0, le=1e-2)
    eval_interval: int = Field(default=100, ge=1, le=1_000_000, description="steps between held-out evaluations (the stability-gap curve)")
    eval_max_docs: int = Field(default=256, ge=1, le=1_000_000, description="held-out documents scored per slice per evaluation")
    checkpoint_interval: int = Field(default=200, ge=1, le=1_000_000, description="steps between resumable checkpoints")
    keep_checkpoints: int = Field(default=3, ge=1, le=1000, description="resumable checkpoints kept on disk (newest)")
    lora_r: int = Field(default=16, ge=1, le=1024)
    lora_alpha: int = Field(default=32, ge=1, le=4096)
    lora_dropout: float = Field(default=0.0, ge=0, le=0.9)
    lora_targets: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="module names LoRA adapts; vLLM serves adapters on these",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto")
    seed: int = Field(default=0, ge=0, description="base seed; each round derives its data/init seeds from it and the round id")
