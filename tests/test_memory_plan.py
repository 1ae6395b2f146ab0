"""The memory plan (`cptd plan`, daemon/jobs/memory_plan.py): the trainer's step on fake tensors predicts a real one.

The same PlanSpec runs twice: on fake tensors with N fake ranks (the plan), and
on real tensors on N gloo ranks under torchrun (the measurement: torch's memory
tracker over real allocations, and the growth of the resident set, printed). The
plan of the Llama-3-8B shape on 8 ranks is checked against figures derived here
from its config.json, not copied from a run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import build_parser, plan_spec
from daemon.cli import main as cli_main
from daemon.jobs.specs import PlanResult, PlanSpec

SHAPES = Path(__file__).parent / "data" / "model_shapes"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A small Llama, wide enough that its tensors, not the allocator's rounding, make up the peak.
SMALL = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}
SMALL_TRAIN = {"parallelism": "fsdp", "micro_batch_size": 2, "seq_len": 128, "grad_accum": 4, "device": "cpu"}


def run_plan(tmp: Path, name: str, ranks: int = 1, **kw) -> PlanResult:
    spec = PlanSpec(out=str(tmp / f"{name}.result.json"), **kw)
    path = spec.write(tmp / f"{name}.json")
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    done = subprocess.run([*launcher, "-m", spec.module, str(path)], capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return PlanResult.model_validate_json(spec.result_file.read_text())


@pytest.mark.parametrize("world", [1, 2])
def test_fake_plan_predicts_the_real_step(tmp_path, world):
    plan = run_plan(tmp_path, "fake", model_shape=SMALL, train=SMALL_TRAIN, gpus=world)
    real = run_plan(tmp_path, "real", ranks=world, model_shape=SMALL, train=SMALL_TRAIN, gpus=world, real=True)
    assert (plan.mode, real.mode, plan.world, real.world) == ("fake", "real", world, world)
    ratio = plan.peak / real.peak
    assert real.rss_delta is not None
    # What the step adds to what a rank holds between steps (its fp32 shards and AdamW state), against RSS growth.
    growth = plan.peak - plan.optimizer - 4 * plan.trainable_total // world
    print(
        f"\n{world} rank(s): plan peak {plan.peak / 2**20:.2f} MiB, measured (tracker, real tensors) {real.peak / 2**20:.2f} MiB, "
        f"ratio {ratio:.3f}; the step's growth: plan {growth / 2**20:.1f} MiB, resident set {real.rss_delta / 2**20:.1f} MiB "
        f"(ratio {growth / real.rss_delta:.2f})"
    )
    assert 0.85 <= ratio <= 1.15
    assert plan.optimizer == real.optimizer  # the state at the peak is shape-exact
    # So are the parameters, but for the gathered LM head (bf16): the fake step peaks while the loss runs inside the
    # head's call (lm_loss.token_nll), where the head is gathered; the real one peaks elsewhere in the step.
    head = SMALL["vocab_size"] * SMALL["hidden_size"] * 2 if world > 1 else 0
    assert plan.parameters - real.parameters in (0, head)
    assert plan.peak == plan.parameters + plan.gradients + plan.optimizer + plan.activations + plan.temporaries
    assert real.accumulated_gradients == plan.accumulated_gradients == 0  # fsdp reduce-scatters every micro-batch


def test_fsdp_accumulation_keeps_gradients_sharded(tmp_path):
    """grad_accum 4 on 2 ranks: each micro-batch's gradients are reduce-scattered, so a rank holds its fp32 shard
    and the one unit in flight, never every layer's whole gradient between micro-batches (issue 23)."""
    r = run_plan(tmp_path, "accum", model_shape=SMALL, train=SMALL_TRAIN, gpus=2)
    assert r.fsdp and r.accumulated_gradients == 0
    unit = SMALL["vocab_size"] * SMALL["hidden_size"]  # the largest unit: the embedding, or the LM head
    assert r.gradients <= 4 * r.trainable_total / 2 + 4 * unit


def llama_parameters(c: dict) -> int:
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    return layers * layer + v * h * (1 if c["tie_word_embeddings"] else 2) + h


def test_8b_plan_on_8_ranks_is_what_the_shapes_say(tmp_path):
    shape = json.loads((SHAPES / "llama-3-8b.json").read_text())
    n, ranks = llama_parameters(shape), 8
    train = {"parallelism": "fsdp", "micro_batch_size": 1, "seq_len": 256, "grad_accum": 1, "activation_checkpointing": True}
    r = run_plan(tmp_path, "8b", model_shape=shape, train=train, gpus=ranks, eval_batch_size=1, gpu_memory_gb=24, volume_gb=500)
    assert r.parameters_total == r.trainable_total == n
    assert r.fsdp and r.precision == "bf16-mixed"
    shard = n / ranks
    unit = shape["vocab_size"] * shape["hidden_size"]  # the largest FSDP unit: the embedding, or the LM head
    assert 4 * shard <= r.parameters <= 4 * shard + 2 * 2 * unit  # fp32 shards + at most two bf16 units gathered
    assert 8 * shard <= r.optimizer <= 8 * shard * 1.01  # AdamW's two fp32 moments, sharded (padding aside)
    assert r.gradients <= 4 * shard + 4 * unit  # sharded fp32 gradients, and the unit being reduced
    assert r.accumulated_gradients == 0  # grad_accum 1: nothing held between micro-batches
    # Activation checkpointing keeps each layer's bf16 input; fp32 at most
    assert r.activations <= shape["num_hidden_layers"] * train["micro_batch_size"] * train["seq_len"] * shape["hidden_size"] * 4
    assert r.peak == r.parameters + r.gradients + r.optimizer + r.activations + r.temporaries
    # Load, export and checkpoint layout: each rank builds its fp32 shard and reads only its rows of the parent; each
    # writes its rows of the bf16 weights one tensor at a time (the largest: its part of the embedding); a checkpoint
    # is bf16 weights + fp32 masters + two fp32 moments, the moments in the newest checkpoint only.
    assert r.device_at_load == r.host_load_per_rank == 4 * n // ranks
    assert r.host_export_rank0 == 2 * unit // ranks
    assert r.checkpoint_bytes == 14 * n and r.final_bytes == 2 * n
    assert r.round_held_bytes == r.checkpoint_bytes + r.final_bytes  # one checkpoint over the plan's steps
    assert r.staged_bytes == r.published_bytes == r.final_bytes  # object storage: the parent staged, the candidate uploaded
    assert all("at load" not in why for why in r.refusals)  # 3.7 GiB per GPU at load, 24 GiB declared
    assert all("volume" not in why for why in r.refusals)  # 120 GB held, 500 GiB declared


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["--model", "{missing}", "--gpus", "1"], "not a readable config.json"),
        (["--model", "{not_a_model}", "--gpus", "1"], "needs model_type"),
        (["--model", "{model}", "--gpus", "0"], "must be at least 1"),
        (["--model", "{model}", "--gpus", "3", "--nodes", "2"], "same number of GPUs"),
        (["--model", "{model}", "--gpus", "2", "--gpu-memory-gb", "-1"], "gpu_memory_gb"),
        (["--model", "{model}", "--gpus", "1", "--policy", "{qlora}"], "qlora"),
        (["--model", "{model}", "--gpus", "1", "--policy", "{bad_policy}"], "invalid policy"),
    ],
)
def test_cli_refuses_bad_input_with_the_cause(tmp_path, capsys, args, cause):
    files = {
        "missing": tmp_path / "absent.json",
        "not_a_model": tmp_path / "list.json",
        "model": SHAPES / "llama-3-8b.json",
        "qlora": tmp_path / "qlora.yaml",
        "bad_policy": tmp_path / "bad.yaml",
    }
    files["not_a_model"].write_text(json.dumps({"hidden_size": 8}))
    files["qlora"].write_text("name: t\ntrain:\n  mode: qlora\n")
    files["bad_policy"].write_text("name: t\ntrain:\n  micro_batch_size: 0\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["plan", *(a.format(**files) for a in args)])
    assert exit_.value.code == 2
    assert cause in capsys.readouterr().err


def test_cli_plans_against_the_daemons_declaration_unless_a_flag_overrides_it(monkeypatch, capsys):
    """`cptd plan` beside the daemon reads what PENDING reads; a flag wins; a bad value is named before any job."""
    model = ["plan", "--model", str(SHAPES / "llama-3-8b.json"), "--gpus", "1"]
    monkeypatch.setenv("CPTD_TRAIN_GPU_MEMORY_GB", "24")
    monkeypatch.delenv("CPTD_TRAIN_HOST_MEMORY_GB", raising=False)
    spec = plan_spec(build_parser().parse_args(model), "plan.json")
    assert (spec.gpu_memory_gb, spec.host_memory_gb) == (24.0, None)
    spec = plan_spec(build_parser().parse_args([*model, "--gpu-memory-gb", "80", "--host-memory-gb", "256"]), "plan.json")
    assert (spec.gpu_memory_gb, spec.host_memory_gb) == (80.0, 256.0)
    monkeypatch.setenv("CPTD_TRAIN_GPU_MEMORY_GB", "24GB")
    with pytest.raises(SystemExit) as exit_:
        cli_main(model)
    assert exit_.value.code == 2
    assert "invalid Settings: train_gpu_memory_gb: Input should be a valid number" in capsys.readouterr().err
    monkeypatch.setenv("CPTD_TRAIN_GPU_MEMORY_GB", "-3")  # checked as the daemon checks it, not only parsed
    with pytest.raises(SystemExit) as exit_:
        cli_main(model)
    assert exit_.value.code == 2
    assert "invalid Settings: train_gpu_memory_gb: Input should be greater than 0" in capsys.readouterr().err


def test_cli_does_not_import_torch():
    code = "import sys, daemon.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 0


def test_pending_refuses_a_round_whose_plan_does_not_fit_the_declared_gpu(redis_client, tmp_path):
    """CPTD_TRAIN_GPU_MEMORY_GB=24, one rank, full fine-tune: a Llama-3-8B parent (its config.json only; PENDING
    reads nothing else of it) is refused before any document moves, with the plan's figures; a small parent under
    the same declaration is not; a second 8B round reads the cached plan instead of running it again."""
    from connectors.redis_store import BatchItem, RedisStore
    from daemon.round_record import RoundState
    from daemon.rounds.context import RoundContext
    from daemon.rounds.pending import pending
    from daemon.rounds.state_machine import drive
    from daemon.settings import Settings
    from policies.config import Policy
    from tests.test_round_retention import _pending_round

    store = RedisStore(redis_client, "plan")
    docs = [BatchItem("t", 0, i, "candidate", key=f"k{i}", nbytes=5, doc={"text": f"doc {i}", "bytes": 5}) for i in range(5)]
    store.write_batch(docs, max_exact_keys=1000)
    buffered = sorted(store.buffer_keys())
    assert len(buffered) == 5
    # The smallest step the trainer takes: the 8B full fine-tune's weights, gradients and AdamW state alone are ~120 GiB.
    policy = Policy.model_validate({"train": {"mode": "full", "micro_batch_size": 1, "seq_len": 16, "grad_accum": 1, "device": "cpu"}})
    settings = Settings(checkpoint_dir=tmp_path / "ck", train_gpu_memory_gb=24, train_cpu_threads=1)
    ctx = RoundContext(store, settings, get_policy=lambda: policy, owner="plan-test")
    ctx.fence = store.lease_acquire(ctx.owner, 600)

    def parent(name: str, shape: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(shape))
        return tmp_path / name

    big = parent("llama-3-8b", json.loads((SHAPES / "llama-3-8b.json").read_text()))
    _pending_round(ctx, "r00001", big)
    out = drive(ctx, "r00001")

    print(f"\n{out.error}")
    assert out.state == RoundState.FAILED and out.snapshot is None, out
    assert out.docs is not None and out.docs.fate == "requeued" and out.docs.docs == 0
    assert sorted(store.buffer_keys()) == buffered  # no document taken
    assert out.error is not None and "refused before taking any document" in out.error
    plan = PlanResult.model_validate_json((tmp_path / "ck" / "rounds" / "r00001" / "memory-plan.json").read_text())
    assert plan.world == 1 and plan.peak > 24 * 2**30
    for figure in (f"peak {plan.peak / 2**30:.1f} GiB per GPU", "against 24 GiB declared", "CPTD_TRAIN_GPU_MEMORY_GB=24"):
        assert figure in out.error, figure
    main = max(("parameters", "gradients", "optimizer", "activations", "temporaries"), key=lambda c: getattr(plan, c))
    assert f"{main} {getattr(plan, main) / 2**30:.1f} GiB the largest part" in out.error
    assert "Change: " in out.error and "train." in out.error.split("Change: ")[1]

    small = parent("small", {**SMALL, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2})
    _pending_round(ctx, "r00002", small)
    rec = ctx.get_round("r00002")
    assert rec is not None
    pending(ctx, rec)
    assert rec.state == RoundState.SNAPSHOT

    _pending_round(ctx, "r00003", big)  # the same shape, policy, ranks and declaration: the cached plan
    again = drive(ctx, "r00003")
    assert again.state == RoundState.FAILED and again.error == out.error.replace("r00001", "r00003")
    assert not (tmp_path / "ck" / "rounds" / "r00003" / "memory-plan-spec.json").exists()
    assert len(list((tmp_path / "ck" / "plans").iterdir())) == 2  # the 8B plan and the small one


def test_the_plan_cache_keeps_only_the_newest_plans(tmp_path):
    """Every policy edit or new parent shape adds a cached plan: the volume must not collect them for ever."""
    from daemon.rounds.memory_fit import prune_plans

    for i in range(40):
        f = tmp_path / f"{i:02d}.json"
        f.write_text("{}")
        os.utime(f, ns=(i * 10**9, i * 10**9))
    prune_plans(tmp_path, keep=32)
    assert sorted(f.name for f in tmp_path.iterdir()) == [f"{i:02d}.json" for i in range(8, 40)]
