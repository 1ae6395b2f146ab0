"""What each torch job reads and writes: the daemon's only import from `daemon/jobs/`.

The daemon runs training, evaluation, the drift probe, the generated-text
detector and the device check as child jobs (docs/architecture.md §3) and talks
to them through files: one spec in, one result out. Every spec is a typed model
that names its job module (`module`) and where its result goes (`result_file`);
every job writes that JSON file atomically as its last act (`write_result`), so
one launcher (daemon/job_launchers.py) starts, follows and reads all of them.
This module holds those file formats and nothing that needs torch, so the
daemon process (and its image without a GPU) imports it cheaply and a spec
written by one version is read by the job of the same version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from policies.gates import ModelScores
from policies.lr_schedule import SchedulePolicy
from policies.train import TrainPolicy


def read_texts(path: str | Path | None) -> list[str]:
    """The `text` of every line of a JSONL file (how the daemon hands documents to a job)."""
    if not path:
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def write_result(path: str | Path, result: Any) -> Path:
    """A job's last act: its result as one JSON file, whole or absent (tmp + rename), so a reader never sees half."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(result, sort_keys=True), encoding="utf-8")
    os.replace(tmp, p)
    return p


# A trainer state directory's optimizer state (checkpoints/step-N/, mainline/): fsdp's DCP shards, or one replica's
# file. Only what a resume needs; the newest checkpoint keeps it, older ones and an evaluated round's drop it.
OPTIMIZER_STATE = ("resume/optim", "resume/optimizer.pt")


def drop_optimizer_state(state_dir: str | Path) -> int:
    """Delete a checkpoint's optimizer state, keeping its weights (servable, scorable) and fp32 masters; returns the
    bytes freed. A checkpoint without it can no longer be resumed from, so callers keep it on the newest one while
    the round may still train. Idempotent."""
    freed = 0
    for rel in OPTIMIZER_STATE:
        path = Path(state_dir) / rel
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
        freed += sum(f.stat().st_size for f in files)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    return freed


class JobSpec(BaseModel):
    """The file a job is started with. Its JSON (sorted keys) is what the digest covers and the job reads back."""

    model_config = ConfigDict(extra="forbid")
    module: ClassVar[str]  # python -m MODULE SPEC.json
    # Where it runs (daemon/job_launchers.py launcher_for). True: it loads a model, so it runs where
    # CPTD_TRAIN_LAUNCHER puts the trainer (a GPU Job on Kubernetes), never in the daemon's pod, which has no GPU
    # on the multi-gpu overlay. False: it needs no device (the memory plan's fake tensors): a child of the daemon.
    on_trainer_device: ClassVar[bool]
    distributed: ClassVar[bool] = False  # True: every rank the launcher starts (the trainer); False: one process
    role: ClassVar[str]  # names its Kubernetes workload, cptd-<role>-<round>-a<attempt>: one per job kind of a round

    @property
    def result_file(self) -> Path:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True)

    def digest(self) -> str:
        """Names the exact input a job ran with (the round record, the Kubernetes workload's annotation)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> Any:  # -> cls
        return cls.model_validate_json(text)

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json(), encoding="utf-8")
        return p

    @classmethod
    def read(cls, path: str | Path) -> Any:  # -> cls
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- training


class TrainSpec(JobSpec):
    """Input of `python -m daemon.jobs.trainer SPEC.json` (docs/round-engine.md)."""

    module: ClassVar[str] = "daemon.jobs.trainer"
    role: ClassVar[str] = "train"
    on_trainer_device: ClassVar[bool] = True
    distributed: ClassVar[bool] = True
    parent_dir: str  # HF checkpoint the round starts from (weights unless resuming / mainline_in); base model in lora mode
    out_dir: str
    new_path: str  # JSONL {"text": ...} per line
    replay_path: str | None = None
    heldout_new_path: str | None = None
    heldout_replay_path: str | None = None
    replay_ratio: float = 0.0  # fraction of the round's training tokens drawn from replay
    schedule: SchedulePolicy = Field(default_factory=SchedulePolicy)  # after the round's drift adjustments
    train: TrainPolicy = Field(default_factory=TrainPolicy)  # the policy's `train` section as the round started
    mainline_in: str | None = None  # infinite: previous round's OUT/mainline; None on the first round
    adapter_in: str | None = None  # lora/qlora: the served adapter this round continues (None: a new adapter)
    data_seed: int = 0  # mixture draw, document shuffle, block order
    init_seed: int = 0  # LoRA init, dropout
    round_id: str = ""
    compile: bool | None = None  # None: the policy's train.compile (auto: on CUDA); a bench sets it either way
    attn_implementation: str = "auto"  # auto: CUDA flash_attention_2 if installed else flex_attention; CPU sdpa
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default. 1 wins on a shared, oversubscribed box

    @property
    def result_file(self) -> Path:
        return Path(self.out_dir) / "result.json"

    @property
    def progress_file(self) -> Path:
        return Path(self.out_dir) / "progress.jsonl"


class TrainEval(BaseModel):
    """One held-out evaluation during training, as the trainer logs it (progress.jsonl, result.json)."""

    step: int
    global_step: int | None = None
    loss_heldout_new: float | None = None  # mean token NLL of the held-out new documents
    loss_heldout_replay: float | None = None  # and of the held-out replay documents


class TrainResult(BaseModel):
    """The trainer's result.json: what EVALUATING and the next round (the infinite schedule's main line) read."""

    round_id: str = ""
    spec: str = ""  # the digest of the spec it ran
    steps: int  # optimizer steps, main line and anneal
    main_steps: int = 0
    anneal_steps: int = 0
    tokens: int = 0
    final: str  # the candidate: weights (or adapter) in the parent's dtype with its config.json
    mainline: str | None = None  # infinite schedule: the state the next round continues
    global_step: int = 0
    mode: str = "full"
    precision: str = ""
    dtype: str = ""
    parallelism: str = "none"
    world_size: int = 1
    peak_memory_mb: float | None = None  # rank 0 over the training steps: CUDA allocated, or RSS on CPU
    peak_memory_kind: str | None = None
    state_mb: float | None = None  # parameters, gradients and optimizer state of rank 0
    process_peak_memory_mb: float | None = None  # rank 0's whole life: load, training, the final gather and write


# --------------------------------------------------------------------------- evaluation


class EvalSpec(JobSpec):
    """Input of `python -m daemon.jobs.evaluator SPEC.json`: the serving model and every candidate, same data."""

    module: ClassVar[str] = "daemon.jobs.evaluator"
    role: ClassVar[str] = "eval"
    on_trainer_device: ClassVar[bool] = True
    round_id: str
    serving: str  # checkpoint directory of the serving model
    candidates: list[list[str]]  # [[name, checkpoint directory], ...]
    new_path: str  # held-out new documents (JSONL)
    replay_path: str  # held-out replay documents (JSONL)
    out: str  # where the EvalReport is written (atomically)
    suites: dict[str, str] = Field(default_factory=dict)  # suite name -> multiple-choice JSONL
    canaries: str | None = None  # JSONL of {"prompt", "expected", "name"?}
    max_len: int = 512
    device: str = "auto"  # the trainer's device: CUDA when present, else CPU
    base: str | None = None  # served base checkpoint: serving/candidates that are LoRA adapters are scored on it
    dtype: str | None = None  # the dtype vLLM serves in (its /server_info); None = each checkpoint's own

    @property
    def result_file(self) -> Path:
        return Path(self.out)

    @property
    def progress_path(self) -> Path:
        return Path(self.out).with_name("eval_progress.jsonl")


@dataclass
class LossSummary:
    mean_nll: float
    perplexity: float
    tokens: int


@dataclass
class SuiteResult:
    name: str
    n: int
    accuracy: float  # argmax of summed log-likelihood (harness `acc`)
    accuracy_norm: float  # argmax of log-likelihood per character of the choice (harness `acc_norm`)
    predictions: list[int] = field(default_factory=list)


@dataclass
class CanaryResult:
    name: str
    prompt: str
    expected: str
    got: str
    passed: bool


@dataclass
class ModelReport:
    name: str
    path: str
    new: LossSummary
    replay: LossSummary
    suites: dict[str, SuiteResult] = field(default_factory=dict)
    canaries: list[CanaryResult] = field(default_factory=list)
    seconds: float = 0.0
    device: str = ""  # where it was scored (cuda:0, cpu)
    dtype: str = ""  # the dtype it was scored in: the checkpoint's, as served

    def scores(self) -> ModelScores:
        return ModelScores(
            name=self.name,
            new_nll=self.new.mean_nll,
            replay_nll=self.replay.mean_nll,
            new_tokens=self.new.tokens,
            replay_tokens=self.replay.tokens,
            suites={k: v.accuracy for k, v in self.suites.items()},
            canaries=len(self.canaries),
            canary_failures=tuple(c.name for c in self.canaries if not c.passed),
        )


@dataclass
class EvalReport:
    """Output of the evaluator: what the gate (policies/gates.py) decides on."""

    round_id: str
    serving: ModelReport
    candidates: list[ModelReport]
    created_at: float = 0.0

    def gate_inputs(self) -> tuple[ModelScores, list[ModelScores]]:
        return self.serving.scores(), [c.scores() for c in self.candidates]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        # NaN is not JSON: a model with no scorable token is stored as null.
        return json.dumps(_nan_to_none(self.to_dict()), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        d = json.loads(text)
        return cls(
            round_id=d["round_id"],
            serving=_model_report(d["serving"]),
            candidates=[_model_report(c) for c in d["candidates"]],
            created_at=d.get("created_at", 0.0),
        )


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _loss(d: dict[str, Any]) -> LossSummary:
    return LossSummary(
        mean_nll=math.nan if d["mean_nll"] is None else d["mean_nll"],
        perplexity=math.nan if d["perplexity"] is None else d["perplexity"],
        tokens=d["tokens"],
    )


def _model_report(d: dict[str, Any]) -> ModelReport:
    return ModelReport(
        name=d["name"],
        path=d["path"],
        new=_loss(d["new"]),
        replay=_loss(d["replay"]),
        suites={k: SuiteResult(**v) for k, v in d["suites"].items()},
        canaries=[CanaryResult(**c) for c in d["canaries"]],
        seconds=d.get("seconds", 0.0),
        device=d.get("device", ""),
        dtype=d.get("dtype", ""),
    )


# --------------------------------------------------------------------------- drift


class DriftSpec(JobSpec):
    """Input of `python -m daemon.jobs.drift_probe SPEC.json`; its result is one object of DriftStats fields."""

    module: ClassVar[str] = "daemon.jobs.drift_probe"
    role: ClassVar[str] = "drift"
    on_trainer_device: ClassVar[bool] = True
    model: str  # checkpoint directory of the serving model
    new_path: str  # new documents (JSONL)
    ref_path: str  # reference documents: the replay reservoir (JSONL)
    out: str  # the result: DriftStats fields, derived figures, device, seconds
    max_docs: int = 256
    max_len: int = 512
    seed: int = 0
    device: str = "auto"  # the trainer's device: CUDA when present, else CPU
    dtype: str | None = None  # the dtype vLLM serves in; None = the checkpoint's own

    @property
    def result_file(self) -> Path:
        return Path(self.out)


class DetectorSpec(JobSpec):
    """Input of `python -m daemon.jobs.generated_text_detector SPEC.json`; its result holds one row per document."""

    module: ClassVar[str] = "daemon.jobs.generated_text_detector"
    role: ClassVar[str] = "detector"
    on_trainer_device: ClassVar[bool] = True
    served: str  # checkpoint directory of the served model (the performer)
    reference: str  # the original base checkpoint (the observer)
    docs_path: str  # documents to score (JSONL with "text"; "key" carried through when present)
    out: str  # the result: {"rows": [{"key", "nll", "xent", "score", "tokens"}, ...], "docs", "device", "seconds"}
    adapter: str | None = None  # the served LoRA adapter, on top of `served`
    max_len: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str | None = None

    @property
    def result_file(self) -> Path:
        return Path(self.out)


class RaterSpec(JobSpec):
    """Input of `python -m daemon.jobs.document_rater SPEC.json`: ratings (policies/rating.py) for a pool of documents.

    `backend: head` reads the served model's hidden states and applies the head `cptd rater-train` wrote
    (`path`, default rater/ next to `served`); `backend: classifier` runs the sequence-classification or
    regression model at `path`.
    """

    module: ClassVar[str] = "daemon.jobs.document_rater"
    role: ClassVar[str] = "rater"
    on_trainer_device: ClassVar[bool] = True
    backend: Literal["classifier", "head"]
    docs_path: str  # documents to rate (JSONL with "text"; "key" carried through when present)
    out: str  # the result: {"rows": [{"key", "overall", "criteria", "domain"} | {"key", "error"}], "docs", "device", "seconds"}
    criteria: list[str]
    domains: list[str]
    scale: int = 5
    served: str | None = None  # head: checkpoint directory of the served model
    adapter: str | None = None  # head: the served LoRA adapter, on top of `served`
    path: str | None = None  # classifier: the model directory; head: the head directory (default: <served>/rater)
    max_len: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str | None = None

    @property
    def result_file(self) -> Path:
        return Path(self.out)


class RaterTrainSpec(JobSpec):
    """Input of `python -m daemon.jobs.rater_training SPEC.json` (`cptd rater-train`): a rater from pointwise ratings.

    Annotation lines are {"text", "ratings": {criterion: 1..scale}, "domain"?} ("overall" may sit at top level).
    Result: {"out_dir", "backend", "lines", "valid", "train", "heldout", "skipped": [{"line", "reason"}],
    "agreement": {...}, "refusal", "device", "seconds"}; refusal is None when a rater was written.
    """

    module: ClassVar[str] = "daemon.jobs.rater_training"
    role: ClassVar[str] = "rater-train"
    on_trainer_device: ClassVar[bool] = True
    annotations: str  # JSONL of pointwise ratings
    served: str  # checkpoint directory of the served model (head: its hidden states; classifier: the model fine-tuned)
    out_dir: str  # where the rater goes (default <served>/rater)
    result_path: str
    backend: Literal["classifier", "head"] = "head"
    criteria: list[str]
    domains: list[str]
    scale: int = 5
    adapter: str | None = None
    holdout: float = 0.2  # share of valid lines held out for the agreement figures
    min_annotations: int = 20  # fewer valid lines: refused
    seed: int = 0
    epochs: int = 0  # 0: the backend's default (head 400 full-batch steps; classifier 3 epochs)
    lr: float = 0.0  # 0: the backend's default
    hidden: int = 0  # head: one hidden layer of N units (0: linear heads)
    max_len: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str | None = None

    @property
    def result_file(self) -> Path:
        return Path(self.result_path)


class DeviceCheckSpec(JobSpec):
    """Input of `python -m daemon.jobs.device_check SPEC.json`: can 4-bit NF4 (qlora) run on `device`?

    The daemon process has no torch; before a qlora round takes any document it asks a job, on the trainer's
    device. Result: {"device", "refusal"} (refusal None when it runs)."""

    module: ClassVar[str] = "daemon.jobs.device_check"
    role: ClassVar[str] = "device-check"
    on_trainer_device: ClassVar[bool] = True
    device: str
    out: str

    @property
    def result_file(self) -> Path:
        return Path(self.out)


# --------------------------------------------------------------------------- memory plan


class PlanSpec(JobSpec):
    """Input of `python -m daemon.jobs.memory_plan SPEC.json` (`cptd plan`): one training step and one evaluation
    step of `train` on a model of `model_config`'s shape, on `gpus` fake ranks (docs/round-engine.md, Memory plan).

    real: run the same step on real tensors, on the ranks torchrun started (gloo, CPU): the check of the plan."""

    module: ClassVar[str] = "daemon.jobs.memory_plan"
    role: ClassVar[str] = "plan"
    on_trainer_device: ClassVar[bool] = False  # fake tensors and a fake process group: no device, no weights
    model_shape: dict[str, Any]  # a Hugging Face config.json (its published shape; no weights)
    train: TrainPolicy = Field(default_factory=TrainPolicy)
    schedule_kind: str = "constant"  # infinite: a round also writes its main line
    gpus: int = Field(default=1, ge=1, le=4096)  # ranks in all
    nodes: int = Field(default=1, ge=1, le=512)
    gpu_memory_gb: float | None = Field(default=None, gt=0)  # per GPU, in GiB; None: not checked
    host_memory_gb: float | None = Field(default=None, gt=0)  # per node
    volume_gb: float | None = Field(default=None, gt=0)  # the checkpoint volume
    steps: int | None = Field(default=None, ge=1)  # a round's optimizer steps (None: train.max_steps, else one checkpoint interval)
    eval_batch_size: int = Field(default=8, ge=1)  # mean_token_loss's windows per forward
    real: bool = False
    out: str

    @property
    def result_file(self) -> Path:
        return Path(self.out)


class PlanResult(BaseModel):
    """Per rank, in bytes. Device figures come from torch's memory tracker over the step; host and volume figures
    from the shapes and the trainer's own load, export and checkpoint layout (docs/round-engine.md, Memory plan)."""

    world: int
    nodes: int
    fsdp: bool
    precision: str
    mode: str  # fake: FakeTensorMode and a fake process group; real: real tensors on gloo ranks
    parameters_total: int  # numbers of parameters of the model
    trainable_total: int
    peak: int  # the training step's peak: the sum of the five below
    parameters: int  # sharded and unsharded (all-gathered) parameters, buffers
    gradients: int  # sharded and unsharded gradients, and those fsdp keeps unsharded through accumulation
    optimizer: int
    activations: int  # saved for backward, and the step's inputs
    temporaries: int  # all-gather / reduce-scatter buffers, logits, the loss' intermediates
    accumulated_gradients: int = 0  # of `gradients`: unsharded fp32 gradients held between micro-batches (fsdp, grad_accum > 1)
    eval_peak: int  # the evaluation step's peak (training state resident)
    device_at_load: int  # the whole model in the trainable dtype, moved to the GPU before it is sharded
    host_load_per_rank: int  # each rank reads the whole parent into host memory
    host_export_rank0: int  # rank 0 gathers every weight in fp32 and writes a copy in the parent's dtype
    checkpoint_bytes: int  # one resumable checkpoint, all ranks together
    final_bytes: int  # the candidate, in the parent's dtype
    round_written_bytes: int
    round_held_bytes: int  # the newest keep_checkpoints checkpoints, the main line and the candidate at once
    # on object storage (CPTD_CHECKPOINT_URL): what scratch holds besides round_held_bytes (the staged parent and main
    # line), and what an accepted round uploads (the candidate and main line)
    staged_bytes: int = 0
    published_bytes: int = 0
    checkpoints_per_round: int
    steps: int
    refusals: list[str] = Field(default_factory=list)  # why this round does not fit what was declared; empty: fits
    rss_delta: int | None = None  # real mode: peak resident set over the step minus the resident set before it
    seconds: float = 0.0
