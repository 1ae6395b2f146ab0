"""A small Llama that knows some English, served by vLLM: the served model of the curation and collapse-guard tests.

A random-init model rates every text alike and generates token salad no
filter would pass, so these tests use the demo's base: the demo-shaped Llama
pre-trained briefly on English prose by the round trainer (daemon/dev/demo.py,
`build_base_model`), stored in bf16 like the checkpoints users serve.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from daemon.dev.vllm_server import VLLMServer

PRETRAIN_STEPS = 200


@pytest.fixture(scope="session")
def english_model(tmp_path_factory) -> Path:
    from daemon.dev.demo import build_base_model

    return build_base_model(tmp_path_factory.mktemp("english-model"), PRETRAIN_STEPS)


@pytest.fixture(scope="session")
def english_vllm(english_model: Path):
    server = VLLMServer(
        model=str(english_model), served_model_name="english", max_model_len=512, log_path=english_model.parent / "vllm.log"
    )
    server.start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def english_deployment(tmp_path, topics, redis_url, bootstrap, english_vllm, english_model, ingest_procs):
    """make(**policy sections) -> a Deployment (tests/test_round_runner.py) whose vLLM serves the English model."""
    from tests.test_round_runner import Deployment

    def make(**over) -> Deployment:
        return Deployment(tmp_path, topics, redis_url, bootstrap, english_vllm, english_model, ingest_procs, **over)

    return make


def generate(url: str, prompts: list[str], max_tokens: int = 160, temperature: float = 0.8, seed: int = 0) -> list[str]:
    """Completions of the served model (the text after each prompt), sampled, one request per 16 prompts."""
    out: list[str] = []
    for i in range(0, len(prompts), 16):
        body = {"model": "english", "prompt": prompts[i : i + 16], "max_tokens": max_tokens, "temperature": temperature, "seed": seed + i}
        r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        out += [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    return out


def generate_until(url: str, prompts: list[str], enough: Callable[[list[str]], bool], seed: int = 0, chunk: int = 64) -> list[str]:
    """Completions of `prompts` in order, `chunk` prompts at a time, until `enough(completions so far)` holds.

    Sampling on a CPU costs most of a collapse-guard test, and a test needs only
    so many usable completions. Each request's seed follows its prompts'
    position (as in one `generate` call over all prompts), so the completions
    are those of a single pass, cut where enough of them are usable.
    """
    assert chunk % 16 == 0, "a chunk must be whole requests of `generate`, or the seeds would shift"
    out: list[str] = []
    for j in range(0, len(prompts), chunk):
        out += generate(url, prompts[j : j + chunk], seed=seed + j)
        if enough(out):
            break
    return out
