"""The round engine end to end on CPU: a tiny Llama, two synthetic domains (English prose, Python code).

Domain A (prose) is what the parent model "was pre-trained on"; domain B (code)
is the new data of a round. The two share almost no frequent tokens, so
adaptation and forgetting are large and clear on a 2-layer model in seconds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama
from daemon.jobs.drift_probe import measure_drift
from daemon.jobs.lm_loss import mean_token_loss
from daemon.jobs.specs import TrainSpec
from daemon.jobs.token_blocks import pack
from daemon.jobs.trainer import packed_logits, run, trainable_digest
from policies.drift import DriftPolicy, adjust_for_drift
from policies.lr_schedule import SchedulePolicy, round_lr
from policies.replay import ReplayPolicy
from tests.kill_at_checkpoint import kill_at_first_checkpoint
from tests.train_device import train_device

pytestmark = pytest.mark.slow  # trains tiny models, SIGKILL/resume and torchrun runs

NOUNS = "cat dog river house garden teacher child window mountain city forest letter market bridge song".split()
ADJS = "quiet old bright small green happy dark warm long gentle".split()
VERBS = "sees finds carries remembers follows paints visits watches builds opens".split()
NAMES = "total count index value result item buffer offset size limit".split()
OPS = "+ - * //".split()


def prose(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [
        " ".join(
            f"The {r.choice(ADJS)} {r.choice(NOUNS)} {r.choice(VERBS)} the {r.choice(NOUNS)} near the {r.choice(ADJS)} {r.choice(NOUNS)}."
            for _ in range(r.randint(2, 5))
        )
        for _ in range(n)
    ]


def code(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        fns = []
        for _ in range(r.randint(1, 3)):
            f, a, b = r.choice(NAMES), r.choice(NAMES), r.choice(NAMES)
            fns.append(
                f"def get_{f}({a}, {b}):\n    if {a} > {r.randint(0, 99)}:\n        return {a} {r.choice(OPS)} {b}\n"
                f"    return {b} {r.choice(OPS)} {r.randint(0, 9)}\n"
            )
        out.append("\n".join(fns))
    return out


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


TRAIN = {
    "seq_len": 64,
    "micro_batch_size": 8,
    "grad_accum": 1,
    "eval_interval": 10,
    "checkpoint_interval": 100,
    "device": "cpu",
    "eval_max_docs": 40,
}
torch.set_num_threads(1)  # 2 cores shared by several jobs: one thread per process is both faster and reproducible


def make_spec(**kw) -> TrainSpec:
    return TrainSpec(cpu_threads=1, **kw)


SHAPE = TinyLlamaShape(vocab_size=384, hidden_size=64, intermediate_size=128, max_position_embeddings=256)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files of both domains, a random-init tiny Llama, and that model pre-trained on domain A."""
    d = tmp_path_factory.mktemp("round")
    w = {
        "dir": d,
        "base": str(build_tiny_llama(d / "base", prose(300, 1) + code(300, 2), SHAPE)),
        "a_train": write_jsonl(d / "a_train.jsonl", prose(500, 3)),
        "a_held": write_jsonl(d / "a_held.jsonl", prose(40, 4)),
        "b_train": write_jsonl(d / "b_train.jsonl", code(160, 5)),
        "b_held": write_jsonl(d / "b_held.jsonl", code(40, 6)),
    }
    pre = run(
        make_spec(
            parent_dir=w["base"],
            out_dir=str(d / "pre_a"),
            new_path=w["a_train"],
            heldout_new_path=w["a_held"],
            schedule={"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.05},
            train={**TRAIN, "epochs": 2, "eval_interval": 1000},
        )
    )
    w["model_a"] = pre["final"]
    return w


def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def heldout_loss(model_dir: str, jsonl: str) -> float:
    model, tok = load(model_dir)
    texts = [json.loads(line)["text"] for line in open(jsonl)]
    return mean_token_loss(model, tok, texts, max_len=64).mean_nll


def events(out_dir: str | Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (Path(out_dir) / "progress.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == kind]


def b_round(w, name: str, replay_ratio: float, seed: int) -> dict:
    return run(
        make_spec(
            parent_dir=w["model_a"],
            out_dir=str(w["dir"] / name),
            new_path=w["b_train"],
            replay_path=w["a_train"],
            heldout_new_path=w["b_held"],
            heldout_replay_path=w["a_held"],
            replay_ratio=replay_ratio,
            data_seed=seed,
            schedule={"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.05},
            train={**TRAIN, "epochs": 2, "eval_interval": 20},
        )
    )


@pytest.fixture(scope="module")
def b_rounds(world):
    return {(r, s): b_round(world, f"b_{r}_{s}", r, s) for r in (0.0, 0.25) for s in (11, 12)}


def test_packing_has_no_padding_and_no_cross_document_attention(world):
    model, tok = load(world["base"])
    docs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in prose(6, 9)]
    ids, pos, tgt = pack(docs, 256, tok.bos_token_id)
    flat = [t for d in docs for t in d]
    assert ids.flatten().tolist() == flat[: ids.numel()]  # every token is real text, in order
    # the second document of the first block sees only itself: same logits as scoring it alone
    first_len = len(docs[0])
    assert first_len < 256 - 5 and pos[0, first_len] == 0 and pos[0, first_len - 1] == first_len - 1
    assert tgt[0, first_len] == -100  # its BOS is not a target across the boundary
    with torch.no_grad():
        second = slice(first_len, min(first_len + len(docs[1]), 256))
        packed = packed_logits(model, ids[:1], pos[:1])[0, second]
        alone = model(input_ids=ids[:1, second]).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_round_lowers_heldout_loss_on_new_domain(world, b_rounds):
    parent = heldout_loss(world["model_a"], world["b_held"])
    after = heldout_loss(b_rounds[(0.0, 11)]["final"], world["b_held"])
    print(f"held-out new-domain loss: parent {parent:.3f} -> after round {after:.3f}")
    assert after < 0.7 * parent
    curve = events(world["dir"] / "b_0.0_11", "eval")
    assert curve[0]["step"] == 0 and len(curve) >= 3 and curve[-1]["loss_heldout_new"] < curve[0]["loss_heldout_new"]


def test_replay_reduces_forgetting(world, b_rounds):
    before = heldout_loss(world["model_a"], world["a_held"])
    for seed in (11, 12):
        rise = {r: heldout_loss(b_rounds[(r, seed)]["final"], world["a_held"]) - before for r in (0.0, 0.25)}
        print(f"seed {seed}: loss rise on domain A, 0% replay {rise[0.0]:.3f}, 25% replay {rise[0.25]:.3f} (A loss before {before:.3f})")
        assert rise[0.0] > 0.2, "no forgetting to prevent: the test domains are too close"
        assert rise[0.25] < 0.5 * rise[0.0]


def test_kill_mid_round_and_resume_gives_identical_weights(world):
    d = world["dir"]

    def spec(name):
        return make_spec(
            parent_dir=world["base"],
            out_dir=str(d / name),
            new_path=world["a_train"],
            replay_path=world["b_train"],
            replay_ratio=0.1,
            data_seed=3,
            schedule={"kind": "rewarm_cosine", "peak_lr": 2e-3},
            train={**TRAIN, "max_steps": 40, "checkpoint_interval": 5, "eval_interval": 100},
        )

    killed = spec("killed")
    (d / "killed.json").write_text(killed.to_json())
    cmd = [sys.executable, "-m", "daemon.jobs.trainer", str(d / "killed.json")]
    assert kill_at_first_checkpoint(cmd, d / "killed") == -signal.SIGKILL
    rerun = subprocess.run(cmd, capture_output=True, text=True, check=True)
    start = [json.loads(x) for x in rerun.stdout.splitlines() if '"start"' in x][0]
    assert start["init_from"] == "checkpoint" and 0 < start["resumed_at"] < 40
    straight = run(spec("straight"))
    a, b = load_file(str(d / "killed" / "final" / "model.safetensors")), load_file(str(Path(straight["final"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = {e["step"]: e["lr"] for e in events(d / "killed", "step")}
    assert steps == {e["step"]: e["lr"] for e in events(d / "straight", "step")}


def test_infinite_main_line_carries_across_rounds(world):
    d = world["dir"]
    sched = {
        "kind": "infinite",
        "warmup_steps": 4,
        "cooldown_steps": 8,
        "eta_max": 3e-3,
        "eta_const": 1.5e-3,
        "eta_min": 1.5e-4,
        "anneal_frac": 0.2,
    }
    sp = SchedulePolicy.model_validate(sched)

    def spec(name, mainline_in, seed):
        return make_spec(
            parent_dir=world["base"],
            out_dir=str(d / name),
            new_path=world["a_train"],
            heldout_new_path=world["a_held"],
            schedule=sched,
            mainline_in=mainline_in,
            data_seed=seed,
            train={**TRAIN, "max_steps": 20},
        )

    r1 = run(spec("inf1", None, 1))
    r2 = run(spec("inf2", r1["mainline"], 2))
    for out, g0 in ((d / "inf1", 0), (d / "inf2", 20)):
        trace = [(e["lr"], e["phase"]) for e in events(out, "step")]
        assert trace == [round_lr(sp, s, 20, g0) for s in range(24)]
        assert [p for _, p in trace] == ["main"] * 20 + ["anneal"] * 4
        assert trace[-1][0] == pytest.approx(1.5e-4)
    lr2 = [e["lr"] for e in events(d / "inf2", "step")]
    assert lr2[:20] == [1.5e-3] * 20  # round 2 never re-warms
    assert [e["lr"] for e in events(d / "inf1", "step")][0] < 1.5e-3  # round 1 warmed up once
    start2 = events(d / "inf2", "start")[0]
    mainline1, _ = load(r1["mainline"])
    final1, _ = load(r1["final"])
    assert start2["init_from"] == "mainline" and start2["global_step0"] == 20
    assert start2["optimizer_steps"] == 20  # AdamW moments of round 1's main line, not a fresh optimizer
    assert start2["init_digest"] == trainable_digest(mainline1) != trainable_digest(final1)
    assert json.loads((Path(r2["mainline"]) / "state.json").read_text())["global_step"] == 40
    # the candidates are anneal branches: lower held-out loss than the main line they branch off
    ev = {e["step"]: e["loss_heldout_new"] for e in events(d / "inf1", "eval")}
    assert ev[24] < ev[20]


def test_lora_writes_an_adapter_peft_and_vllm_layout_load(world):
    from peft import PeftModel

    out = world["dir"] / "lora"
    r = run(
        make_spec(
            parent_dir=world["model_a"],
            out_dir=str(out),
            new_path=world["b_train"],
            heldout_new_path=world["b_held"],
            schedule={"kind": "constant", "peak_lr": 3e-3},
            train={**TRAIN, "mode": "lora", "lora_r": 8, "lora_alpha": 16, "max_steps": 15},
        )
    )
    final = Path(r["final"])
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and set(cfg["target_modules"]) == set(TRAIN.get("lora_targets", cfg["target_modules"]))
    base, tok = load(world["model_a"])
    texts = [json.loads(x)["text"] for x in open(world["b_held"])]
    base_loss = mean_token_loss(base, tok, texts, max_len=64).mean_nll
    adapted = PeftModel.from_pretrained(base, str(final))
    loss = mean_token_loss(adapted, tok, texts, max_len=64).mean_nll
    assert loss == pytest.approx(events(out, "eval")[-1]["loss_heldout_new"], abs=1e-4)  # the adapter is what was trained
    assert loss < base_loss - 0.3


def test_drift_same_distribution_scores_lower_than_shifted(world):
    ref = [json.loads(x)["text"] for x in open(world["a_held"])]
    same = measure_drift(world["model_a"], prose(40, 21), ref, max_len=64)
    shifted = measure_drift(world["model_a"], code(40, 22), ref, max_len=64)
    print(f"same: gap {same.ppl_gap:.3f} js {same.js_distance:.3f}; shifted: gap {shifted.ppl_gap:.3f} js {shifted.js_distance:.3f}")
    assert same.ppl_gap < shifted.ppl_gap and same.js_distance < shifted.js_distance
    p, r = DriftPolicy(), ReplayPolicy()
    d_same, d_shift = adjust_for_drift(same, p, r), adjust_for_drift(shifted, p, r)
    assert d_same.score < d_shift.score
    assert d_same.replay_ratio < d_shift.replay_ratio and d_same.peak_lr < d_shift.peak_lr


def test_torchrun_two_ranks_trains_one_consistent_model(world):
    """DDP under torchrun (gloo on CPU, nccl where there is a GPU per rank): both ranks step together; the saved
    candidate learned the new domain."""
    d = world["dir"]
    spec = make_spec(
        parent_dir=world["model_a"],
        out_dir=str(d / "ddp"),
        new_path=world["b_train"],
        heldout_new_path=world["b_held"],
        data_seed=5,
        schedule={"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.05},
        train={**TRAIN, "max_steps": 12, "eval_interval": 100, "device": train_device(2)},
    )
    (d / "ddp.json").write_text(spec.to_json())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "daemon.jobs.trainer",
        str(d / "ddp.json"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((d / "ddp" / "result.json").read_text())
    start = events(d / "ddp", "start")[-1]
    assert start["tokens_per_step"] == 2 * TRAIN["micro_batch_size"] * TRAIN["seq_len"]  # two ranks' micro-batches per step
    assert result["steps"] == 12
    assert heldout_loss(result["final"], world["b_held"]) < 0.8 * heldout_loss(world["model_a"], world["b_held"])
