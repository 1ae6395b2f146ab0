"""The trainer's knobs as the operator sets them; the daemon copies them into each round's TrainSpec."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from policies.base import Section


class TrainPolicy(Section):
    mode: Literal["full", "lora", "qlora"] = Field(
        default="full",
        description="full: every weight, hot-swapped into vLLM; lora: an adapter on the served base, loaded by vLLM --enable-lora; "
        "qlora: lora trained over a 4-bit NF4 copy of the base (bitsandbytes), shipped and scored like lora",
    )
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-params", "fp16-mixed"] = Field(
        default="auto",
        description="training math; candidates are always written in the parent's dtype. auto: bf16 parent -> bf16-mixed, "
        "fp16 parent -> fp16-mixed (bf16-mixed under fsdp), fp32 parent -> fp32 on CPU and bf16-mixed on CUDA "
        "(docs/round-engine.md, Precision)",
    )
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
    parallelism: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="with several ranks (torchrun): ddp keeps a full replica per rank; fsdp shards parameters, gradients and "
        "optimizer state (FSDP2, one unit per decoder layer + the root) and checkpoints them with torch.distributed.checkpoint",
    )
    activation_checkpointing: bool = Field(default=False, description="recompute decoder-layer activations in backward (less memory)")
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="torch.compile the training model. auto: on CUDA (about twice eager's tokens/s for a 0.5B model on an "
        "H100, bench/README.md), except qlora (bitsandbytes' 4-bit kernels break the graph); off on CPU, where compiling "
        "costs minutes and gains little",
    )
    cpu_offload: bool = Field(default=False, description="fsdp: keep sharded parameters, gradients and optimizer state in CPU memory")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="also the collective backend's: cuda -> nccl, cpu -> gloo")
    collective_timeout_min: float = Field(
        default=30,
        gt=0,
        le=24 * 60,
        description="minutes a rank waits in a collective; above NCCL's 10-minute default, since the other ranks wait at "
        "a barrier while rank 0 evaluates or writes a checkpoint",
    )
    seed: int = Field(default=0, ge=0, description="base seed; each round derives its data/init seeds from it and the round id")

    @model_validator(mode="after")
    def _supported_combinations(self) -> TrainPolicy:
        if self.mode == "qlora" and self.precision not in ("auto", "bf16-mixed"):
            raise ValueError(f"train.mode qlora computes in bf16 over fp32 adapter weights; precision {self.precision!r} is not supported")
        if self.parallelism == "fsdp" and self.precision in ("fp16-mixed", "bf16-params"):
            raise ValueError(f"train.parallelism fsdp supports precision auto, bf16-mixed or fp32, not {self.precision!r}")
        if self.parallelism == "fsdp" and self.mode == "qlora":
            raise ValueError("train.parallelism fsdp does not shard a 4-bit base; qlora rounds run on one GPU (ddp)")
        if self.cpu_offload and self.parallelism != "fsdp":
            raise ValueError("train.cpu_offload needs train.parallelism fsdp (on several ranks: one rank is not sharded)")
        return self


def resolve_compile(setting: str, device_type: str, mode: str) -> bool:
    """Whether a round's trainer compiles: the policy's `compile`, with auto on wherever it pays (CUDA, not 4-bit)."""
    if setting != "auto":
        return setting == "on"
    return device_type == "cuda" and mode != "qlora"


# What each precision keeps in memory and how the step runs; resolve_precision picks one for "auto".
MIXED = {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}  # autocast dtype over fp32 master weights


def resolve_precision(precision: str, parent_dtype: str, device_type: str, parallelism: str = "ddp") -> str:
    """The concrete precision of a round: the policy's, or for "auto" the parent's dtype on this device. `parallelism`:
    what the ranks actually run ("fsdp" only with several); fsdp has no sharded GradScaler, so an fp16 parent trains
    in bf16-mixed there (bf16 covers fp16's range) and is still written in fp16, never in a combination the
    policy's validation refuses."""
    if precision != "auto":
        return precision
    if parent_dtype == "bfloat16":
        return "bf16-mixed"
    if parent_dtype == "float16":
        return "bf16-mixed" if parallelism == "fsdp" else "fp16-mixed"
    return "bf16-mixed" if device_type == "cuda" else "fp32"
