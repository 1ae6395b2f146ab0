"""FSDP's load and export never hold the whole model on a rank (issue 23), and load exactly what the unsharded load does.

Two gloo ranks run tests/fsdp_load_probe.py under torchrun on a 36M-parameter
bf16 Llama (136 MiB in fp32: large enough that the allocator's and the
threads' own memory do not decide the figures): each rank builds the model on
the meta device, shards it, reads its rows of the parent, then writes its rows
of the consolidated bf16 weights. Before (every rank loading the whole parent,
rank 0 gathering it in fp32 and writing a bf16 copy) the same probe measured
1.6x the model at load and 1.5x on rank 0 at export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from connectors.vllm import validate_checkpoint
from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama
from daemon.jobs.specs import TrainSpec

pytestmark = pytest.mark.slow  # torchrun with two ranks
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SHAPE = TinyLlamaShape(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded_io")
    texts = [f"the fox {i} jumps over dog {i * 7} " + " ".join(str(j * i) for j in range(40)) for i in range(3000)]
    big = build_tiny_llama(d / "big", texts, SHAPE, dtype="bfloat16")
    # a tied one: the LM head is the input embedding, one tensor in the file (and one parameter once sharded)
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(big)
    # an odd vocabulary: the ranks' shards of the embedding differ by a row
    cfg.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2})
    cfg.vocab_size -= 1 - cfg.vocab_size % 2
    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    tied = d / "tied"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(tied))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(big / f, tied / f)
    return d, big, tied


def probe(d: Path, parent: Path, name: str) -> list[dict]:
    spec = TrainSpec(
        parent_dir=str(parent), out_dir=str(d / name), new_path=str(d / "none.jsonl"), train={"parallelism": "fsdp", "device": "cpu"}
    )
    (d / f"{name}.json").write_text(spec.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tests.fsdp_load_probe"]
    done = subprocess.run(
        [*cmd, str(d / f"{name}.json"), str(d / f"{name}.result.json")], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((d / f"{name}.result.json").read_text())


def test_fsdp_load_and_export_hold_about_a_shard_per_rank(parents):
    d, big, _ = parents
    ranks = probe(d, big, "big")
    model = ranks[0]["model_bytes"]  # the whole model in fp32, what every rank held before and rank 0 gathered
    for r in ranks:
        print(
            f"\nrank {r['rank']}: model {model / 2**20:.1f} MiB (fp32); load: shard {r['held'] / 2**20:.1f} MiB held, "
            f"resident set peak growth {r['load'] / 2**20:.1f} MiB ({r['load'] / model:.2f}x); "
            f"export: peak growth {r['export'] / 2**20:.1f} MiB ({r['export'] / model:.2f}x)"
        )
        assert r["held"] <= model / 2 * 1.01  # its fp32 shard
        assert r["load"] <= 0.6 * model
    assert ranks[0]["export"] <= 0.6 * model
    assert ranks[0]["params_equal"] and ranks[0]["buffers_equal"]  # bit for bit the unsharded load
    export = d / "big" / "export"
    validate_checkpoint(export, big)  # names, shapes, dtypes, config, tokenizer: what DEPLOYING checks
    # loaded from the parent and written back in its dtype: the parent's bytes, header included
    assert (export / "model.safetensors").read_bytes() == (big / "model.safetensors").read_bytes()


def test_tied_embeddings_and_uneven_shards_load_and_export_as_the_unsharded_model(parents):
    d, _, tied = parents
    (r0, _) = probe(d, tied, "tied")
    assert r0["tied"] and r0["params_equal"] and r0["buffers_equal"]
    validate_checkpoint(d / "tied" / "export", tied)
    assert (d / "tied" / "export" / "model.safetensors").read_bytes() == (tied / "model.safetensors").read_bytes()
