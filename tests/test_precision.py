"""Rounds on checkpoints stored the way people serve them: bf16 and fp16 parents, LoRA and QLoRA adapters.

The first version trained everything in fp32 and wrote fp32 candidates, which
vLLM's bf16 replicas refused at deploy. These tests hold the contract of
docs/round-engine.md (Precision): whatever the training math, what a round
writes is in the parent's dtype with the parent's config.json, passes the same
validation the deploy runs, and a killed round resumes to the same bits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from connectors.vllm import tensor_inventory, validate_checkpoint, validate_lora_adapter
from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama, cast_checkpoint
from daemon.jobs.evaluator import EvalData, evaluate_round
from daemon.jobs.lm_loss import mean_token_loss
from daemon.jobs.model_loader import ModelLoadError, four_bit_refusal, load_causal_lm, load_tokenizer
from daemon.jobs.specs import TrainSpec
from daemon.jobs.trainer import MASTER_FILE, OPTIMIZER_FILE, run
from policies.train import TrainPolicy, resolve_compile
from tests.kill_at_checkpoint import kill_at_first_checkpoint

pytestmark = pytest.mark.slow  # trains tiny models in several precisions, one SIGKILL/resume

torch.set_num_threads(1)
SHAPE = TinyLlamaShape(vocab_size=384, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
DTAG = {"bfloat16": "BF16", "float16": "F16"}
TRAIN = {"seq_len": 32, "micro_batch_size": 4, "grad_accum": 1, "eval_interval": 100, "checkpoint_interval": 5, "device": "cpu"}


def texts(n: int, seed: int) -> list[str]:
    words = "river stone garden lamp harbour signal copper winter letter market bridge orchard".split()
    return [" ".join(words[(i * 7 + j * (seed + 3)) % len(words)] for j in range(12)) + f" {i}." for i in range(n)]


def write_jsonl(path: Path, rows: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("precision")
    bf16 = build_tiny_llama(d / "bf16", texts(200, 1), SHAPE, dtype="bfloat16")
    return {
        "dir": d,
        "bfloat16": str(bf16),
        "float16": str(cast_checkpoint(bf16, d / "fp16", "float16")),
        "new": write_jsonl(d / "new.jsonl", texts(224, 2)[:200]),
        "held": write_jsonl(d / "held.jsonl", texts(224, 2)[200:]),
    }


def spec(world, name: str, parent: str, **train) -> TrainSpec:
    return TrainSpec(
        parent_dir=parent,
        out_dir=str(world["dir"] / name),
        new_path=world["new"],
        heldout_new_path=world["held"],
        schedule=train.pop("schedule", {"kind": "constant", "peak_lr": 2e-3}),
        train={**TRAIN, "max_steps": 10, **train},
        data_seed=4,
        cpu_threads=1,
    )


def dtypes(d: Path) -> set[str]:
    inv, problems = tensor_inventory(d)
    assert not problems, problems
    return {dt for _, dt in inv.values()}


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "progress.jsonl").read_text().splitlines()) if e["event"] == "step"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_candidate_checkpoints_and_main_line_keep_the_parents_dtype_and_config(world, dtype):
    parent = Path(world[dtype])
    sched = {"kind": "infinite", "warmup_steps": 2, "cooldown_steps": 4, "eta_max": 2e-3, "eta_const": 1e-3, "eta_min": 1e-4}
    r = run(spec(world, f"full-{dtype}", str(parent), schedule=sched))
    assert r["dtype"] == dtype and r["precision"] == {"bfloat16": "bf16-mixed", "float16": "fp16-mixed"}[dtype]
    assert r["compiled"] is False  # compile: auto is off on CPU
    out = Path(r["final"]).parent
    written = [Path(r["final"]), Path(r["mainline"]), *sorted((out / "checkpoints").glob("step-*"))]
    assert len(written) >= 3
    for d in written:
        validate_checkpoint(d, parent)  # what DEPLOYING runs before any replica sees the candidate
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).read_bytes() == (parent / name).read_bytes(), (d, name)
        assert dtypes(d) == {DTAG[dtype]}, d
    for d in written[1:]:  # resumable states carry the fp32 masters the rounded weights came from
        masters = load_file(str(d / MASTER_FILE))
        assert {t.dtype for t in masters.values()} == {torch.float32}
    assert not (Path(r["final"]) / MASTER_FILE).exists()  # the candidate is only what vLLM loads
    ls = losses(out)
    assert all(map(torch.isfinite, torch.tensor(ls))) and ls[-1] < ls[0] - 0.5  # fp16: loss scaling kept it finite and learning


def test_killed_bf16_round_resumes_to_identical_bits(world):
    s = spec(world, "killed", world["bfloat16"], max_steps=20)
    path = world["dir"] / "killed.json"
    path.write_text(s.to_json())
    cmd = [sys.executable, "-m", "daemon.jobs.trainer", str(path)]
    assert kill_at_first_checkpoint(cmd, s.out_dir) == -signal.SIGKILL
    rerun = subprocess.run(cmd, capture_output=True, text=True, check=True)
    start = [json.loads(x) for x in rerun.stdout.splitlines() if '"start"' in x][0]
    assert start["init_from"] == "checkpoint" and 0 < start["resumed_at"] < 20
    straight = run(spec(world, "straight", world["bfloat16"], max_steps=20))
    a = load_file(str(Path(s.out_dir) / "final" / "model.safetensors"))
    b = load_file(str(Path(straight["final"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(Path(s.out_dir))[-1] == losses(Path(straight["final"]).parent)[-1]


def test_bf16_params_trains_bf16_weights_with_fp32_optimizer_state(world):
    r = run(spec(world, "bf16-params", world["bfloat16"], precision="bf16-params"))
    ck = sorted((Path(r["final"]).parent / "checkpoints").glob("step-*"))[-1]
    assert not (ck / MASTER_FILE).exists()  # the weights are the trained values themselves
    opt = torch.load(ck / OPTIMIZER_FILE, weights_only=True)["optimizer"]["state"]
    assert {t.dtype for s in opt.values() for k, t in s.items() if k != "step"} == {torch.float32}
    validate_checkpoint(r["final"], world["bfloat16"])
    assert dtypes(Path(r["final"])) == {"BF16"}


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapters_on_a_bf16_base_are_bf16_and_help_on_the_base_as_served(world, mode):
    r = run(
        spec(
            world,
            f"adapter-{mode}",
            world["bfloat16"],
            mode=mode,
            lora_r=8,
            lora_alpha=32,
            max_steps=30,
            schedule={"kind": "constant", "peak_lr": 2e-2},
        )
    )
    final = Path(r["final"])
    validate_lora_adapter(final, max_rank=8)
    assert dtypes(final) == {"BF16"} and not (final / "model.safetensors").exists()
    tok = load_tokenizer(world["bfloat16"])
    held = [json.loads(x)["text"] for x in open(world["held"])]
    base = load_causal_lm(world["bfloat16"], device="cpu")
    assert next(base.parameters()).dtype == torch.bfloat16
    before = mean_token_loss(base, tok, held, max_len=32).mean_nll
    served = load_causal_lm(world["bfloat16"], device="cpu", adapter=final)  # the bf16 base vLLM serves, not the 4-bit copy
    after = mean_token_loss(served, tok, held, max_len=32).mean_nll
    assert after < before - 0.2


def test_evaluation_scores_in_the_served_dtype_and_says_where(world):
    r = run(spec(world, "for-eval", world["bfloat16"]))
    data = EvalData(new_docs=[json.loads(x)["text"] for x in open(world["held"])], replay_docs=texts(8, 9), device="auto", max_len=32)
    rep = evaluate_round("r1", world["bfloat16"], [r["final"]], data, names=["final"])
    for m in (rep.serving, *rep.candidates):
        assert m.dtype == "bfloat16" and m.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert rep.candidates[0].new.mean_nll < rep.serving.new.mean_nll


def test_loader_refuses_pickled_weights_and_unrunnable_4bit(world, tmp_path):
    import shutil

    (tmp_path / "pickled").mkdir()  # the layout of an old pickled checkpoint: config + pytorch_model.bin
    shutil.copy(Path(world["bfloat16"]) / "config.json", tmp_path / "pickled")
    torch.save(load_file(str(Path(world["bfloat16"]) / "model.safetensors")), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_causal_lm(tmp_path / "pickled")
    assert four_bit_refusal(torch.device("cpu")) is None  # bitsandbytes runs NF4 on this CPU
    why = four_bit_refusal(torch.device("meta"))
    assert why is not None and "cannot run 4-bit NF4 on meta" in why
    with pytest.raises(ModelLoadError, match="4-bit NF4 on meta"):
        load_causal_lm(world["bfloat16"], device=torch.device("meta"), quantize="nf4")


def test_qlora_only_with_bf16_compute():
    TrainPolicy(mode="qlora", precision="bf16-mixed")
    with pytest.raises(ValueError, match="qlora computes in bf16"):
        TrainPolicy(mode="qlora", precision="fp16-mixed")


def test_compile_auto_compiles_on_cuda_only_and_never_a_4bit_base():
    """Production rounds compile by default where it pays (about 2x eager on an H100); CPU rounds and 4-bit don't."""
    assert TrainPolicy().compile == "auto"
    assert resolve_compile("auto", "cuda", "full") and resolve_compile("auto", "cuda", "lora")
    assert not resolve_compile("auto", "cpu", "full") and not resolve_compile("auto", "cuda", "qlora")
    assert resolve_compile("on", "cpu", "full") and not resolve_compile("off", "cuda", "full")
