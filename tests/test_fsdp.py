"""FSDP2 rounds under torchrun, on CPU with gloo (tests/train_device.py: CUDA with nccl where the host has a GPU per
rank): the same model as DDP, sharded checkpoints, resume, multi-node.

A bf16 tiny Llama is trained by two ranks with `train.parallelism: fsdp` and
with `ddp` from the same spec; the consolidated candidate must be what the swap
accepts, and the two must agree. A round killed mid-way resumes from its DCP
shards; two torchrun launchers of one rank each, meeting over c10d on
loopback (two "nodes"), train the same model as one launcher with two ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from connectors.vllm import tensor_inventory, validate_checkpoint
from daemon.dev.services import free_port
from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama
from daemon.jobs.lm_loss import mean_token_loss
from daemon.jobs.model_loader import load_causal_lm, load_tokenizer
from daemon.jobs.specs import TrainSpec
from tests.kill_at_checkpoint import kill_at_first_checkpoint
from tests.train_device import train_device

pytestmark = pytest.mark.slow  # several two-rank torchrun runs

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = {"seq_len": 32, "micro_batch_size": 4, "grad_accum": 2, "max_steps": 12, "eval_interval": 100, "checkpoint_interval": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    words = ["red", "brown", "grey", "tired", "quick", "lazy"]
    texts = [f"the {words[i % 6]} fox {i} jumps over the {words[(i * 5) % 6]} dog number {i * 7} today" for i in range(400)]
    shape = TinyLlamaShape(vocab_size=384, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    (d / "new.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:360]))
    (d / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[360:]))
    return {"dir": d, "base": build_tiny_llama(d / "base", texts, shape, dtype="bfloat16"), "held": [t for t in texts[360:]]}


def spec_file(world, name: str, **train) -> Path:
    d = world["dir"]
    spec = TrainSpec(
        parent_dir=str(world["base"]),
        out_dir=str(d / name),
        new_path=str(d / "new.jsonl"),
        heldout_new_path=str(d / "held.jsonl"),
        schedule={"kind": "constant", "peak_lr": 3e-3},
        train={**TRAIN, "device": train_device(2), **train},  # two ranks, on one launcher or two
        data_seed=3,
        cpu_threads=1,
    )
    path = d / f"{name}.json"
    path.write_text(spec.to_json())
    return path


def torchrun(spec: Path, *launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "daemon.jobs.trainer", str(spec)]


def two_ranks(spec: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun(spec, "--standalone", "--nproc-per-node", "2"), capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def events(out: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "progress.jsonl").read_text().splitlines()) if e["event"] == kind]


def heldout(world, ckpt: Path) -> float:
    model = load_causal_lm(ckpt, device="cpu", dtype=torch.float32)
    return mean_token_loss(model, load_tokenizer(ckpt), world["held"], max_len=32).mean_nll


def test_fsdp_matches_ddp_and_writes_a_consolidated_candidate_in_the_parents_dtype(world):
    two_ranks(spec_file(world, "ddp", parallelism="ddp"))
    two_ranks(spec_file(world, "fsdp", parallelism="fsdp"))
    d = world["dir"]
    start = events(d / "fsdp", "start")[-1]
    assert start["parallelism"] == "fsdp" and start["world_size"] == 2 and start["precision"] == "bf16-mixed"
    final = d / "fsdp" / "final"
    validate_checkpoint(final, world["base"])  # what DEPLOYING runs before any replica sees it
    assert {dt for _, dt in tensor_inventory(final)[0].values()} == {"BF16"}
    ckpt = sorted((d / "fsdp" / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in (ckpt / "resume" / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a shard per rank
    validate_checkpoint(ckpt, world["base"])  # a mid-round checkpoint is servable as it is
    # optimizer state in the newest checkpoint only (a resume reads no other); every one keeps its weights and masters
    for run, optim in (("fsdp", "resume/optim"), ("ddp", "resume/optimizer.pt")):
        ckpts = sorted((d / run / "checkpoints").glob("step-*"))
        assert len(ckpts) == 3 and [(c / optim).exists() for c in ckpts] == [False, False, True], run
    assert all((c / "resume" / "dcp" / ".metadata").exists() for c in (d / "fsdp" / "checkpoints").glob("step-*"))
    ddp, fsdp, base = heldout(world, d / "ddp" / "final"), heldout(world, final), heldout(world, Path(world["base"]))
    assert fsdp < base - 1.0 and abs(fsdp - ddp) <= 0.02 * ddp, (base, ddp, fsdp)


def test_killed_fsdp_round_resumes_from_its_shards_and_refuses_another_world_size(world):
    spec = spec_file(world, "killed", parallelism="fsdp")  # the spec of the first test's `fsdp` run, killed at step 4 of 12
    out = world["dir"] / "killed"
    # rank 0's progress lines; at the first complete checkpoint stop everything: torchrun's workers are not in its
    # process group, so every process running this spec is killed
    kill_at_first_checkpoint(
        torchrun(spec, "--standalone", "--nproc-per-node", "2"),
        out,
        env=ENV,
        kill=lambda _: subprocess.run(["pkill", "-KILL", "-f", str(spec)], check=False),
    )
    one = subprocess.run([sys.executable, "-m", "daemon.jobs.trainer", str(spec)], capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode != 0 and "written by 2 ranks and this run has 1" in one.stderr
    two_ranks(spec)
    start = events(out, "start")[-1]
    assert start["init_from"] == "checkpoint" and 0 < start["resumed_at"] < TRAIN["max_steps"]
    assert start["optimizer_steps"] == start["resumed_at"]
    # the same spec run straight through: the first test's `fsdp` run (run here when this test runs alone)
    if not (world["dir"] / "fsdp" / "final").exists():
        two_ranks(spec_file(world, "fsdp", parallelism="fsdp"))
    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(world["dir"] / "fsdp" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the shards held the fp32 masters and AdamW state


def test_two_launchers_over_c10d_train_the_model_of_one_launcher_with_two_ranks(world):
    port = free_port()
    spec = spec_file(world, "nodes", parallelism="fsdp")
    nodes = [
        subprocess.Popen(
            torchrun(
                spec,
                "--nnodes",
                "2",
                "--node-rank",
                str(i),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "cptd-test",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for i in range(2)
    ]
    for n in nodes:
        _, err = n.communicate(timeout=600)
        assert n.returncode == 0, err[-3000:]
    if not (world["dir"] / "fsdp" / "final").exists():
        two_ranks(spec_file(world, "fsdp", parallelism="fsdp"))
    a = load_file(str(world["dir"] / "nodes" / "final" / "model.safetensors"))
    b = load_file(str(world["dir"] / "fsdp" / "final" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-2, rtol=2e-2), k
