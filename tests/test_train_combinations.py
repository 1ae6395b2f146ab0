"""Training combinations that cannot run are refused before anything moves; `auto` never resolves to one (issue 23)."""

from __future__ import annotations

import pytest

from daemon.jobs.specs import TrainSpec
from daemon.jobs.trainer import run
from policies.train import TrainPolicy, resolve_precision


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_fp16_parent_under_fsdp_resolves_auto_to_a_precision_fsdp_accepts(device):
    precision = resolve_precision("auto", "float16", device, parallelism="fsdp")
    assert precision == "bf16-mixed"  # fsdp has no sharded loss scaling for fp16; bf16 covers fp16's range
    TrainPolicy(parallelism="fsdp", precision=precision)  # what validation accepts
    assert resolve_precision("auto", "float16", device) == "fp16-mixed"  # one replica per rank keeps fp16 + GradScaler
    with pytest.raises(ValueError, match="fp16-mixed"):
        TrainPolicy(parallelism="fsdp", precision="fp16-mixed")  # asked for explicitly: refused with the cause


def test_cpu_offload_on_one_rank_is_refused_before_the_round_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "out"
    spec = TrainSpec(
        parent_dir=str(tmp_path / "parent"),
        out_dir=str(out),
        new_path=str(tmp_path / "new.jsonl"),
        train={"parallelism": "fsdp", "cpu_offload": True, "device": "cpu"},
    )
    with pytest.raises(SystemExit, match="cpu_offload.*one rank"):
        run(spec)
    assert not out.exists()  # nothing written, nothing loaded
