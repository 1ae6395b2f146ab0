"""Real vLLM CPU servers for the serving tests, shared per session because each start costs ~60 s.

Registered once in tests/conftest.py (`pytest_plugins`): a test module must not
import these fixtures, or it gets its own copy, built and started a second time.

Models are built locally (no hub): two tiny Llamas with one shared tokenizer
and different seeds (so greedy completions differ), and three LoRA adapters on
the first. Servers are stopped by process group at teardown, whatever the
tests did.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from connectors.vllm import Replica
from daemon.dev.vllm_server import VLLMServer

CORPUS = [
    f"the {a} {b} of round {i} jumps over the {c} dog and reads {i * 7} new documents"
    for i, (a, b, c) in enumerate(
        (a, b, c)
        for a in ("quick", "slow", "red", "tired", "clever")
        for b in ("fox", "cat", "model", "server", "daemon", "reader")
        for c in ("lazy", "sleepy", "busy", "small")
    )
]
SERVED_NAME = "tiny"


@dataclass(frozen=True)
class TinyModels:
    base: Path  # what the servers boot with
    other: Path  # same config and tokenizer, other seed: other greedy completions
    lora1: Path
    lora2: Path
    lora3: Path
    root: Path


def _build_lora(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    torch.manual_seed(seed)
    # init_lora_weights=False: non-zero B, so each adapter changes the output (a zero adapter proves nothing).
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_models(root: Path) -> TinyModels:
    from daemon.dev.tiny_model import build_tiny_llama

    base = build_tiny_llama(root / "base", CORPUS, seed=0)
    other = root / "other"
    shutil.copytree(base, other)
    # Same tokenizer and config by construction; only the weights differ.
    build_tiny_llama(root / "other-build", CORPUS, seed=1)
    shutil.copy(root / "other-build" / "model.safetensors", other / "model.safetensors")
    shutil.rmtree(root / "other-build")
    return TinyModels(
        base=base,
        other=other,
        lora1=_build_lora(base, root / "lora1", 1),
        lora2=_build_lora(base, root / "lora2", 2),
        lora3=_build_lora(base, root / "lora3", 3),
        root=root,
    )


def start_server(models: TinyModels, log_name: str) -> VLLMServer:
    return VLLMServer(
        model=str(models.base), served_model_name=SERVED_NAME, enable_lora=True, max_lora_rank=8, log_path=models.root / log_name
    ).start(timeout=300)


def reset_to_base(url: str, base: Path) -> None:
    """Tests share one server: put its weights back to the boot checkpoint before each test."""
    r = Replica(url)
    try:
        r.pause()
        r.reload_weights(str(base))
        r.reset_prefix_cache()
        r.resume()
    finally:
        r.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def _serve(models: TinyModels, log_name: str):
    server = start_server(models, log_name)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(tiny_models: TinyModels):
    """One LoRA-enabled server for every serving test that leaves it alive."""
    yield from _serve(tiny_models, "vllm-shared.log")


@pytest.fixture(scope="session")
def vllm_crash_server(tiny_models: TinyModels):
    """A second replica that tests may kill and restart; same boot model and flags as `vllm_server`."""
    yield from _serve(tiny_models, "vllm-crash.log")


def bf16_copy(src: Path, out: Path) -> Path:
    """The same checkpoint in bfloat16, config.json saying so (what a bf16 training run writes)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def vllm_plain_server(tiny_models: TinyModels):
    """A server started WITHOUT --enable-lora, from a bf16 copy of the base model with the default dtype
    ("auto": the checkpoint's own dtype). Costs ~60 s; for tests of what a server can take."""
    model = bf16_copy(tiny_models.base, tiny_models.root / "base-bf16")
    server = VLLMServer(model=str(model), served_model_name=SERVED_NAME, log_path=tiny_models.root / "vllm-plain.log").start(timeout=300)
    try:
        yield server
    finally:
        server.stop()
