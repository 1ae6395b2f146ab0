"""Real completions of the demo-shaped model for bench/echo_recall.py: built as the collapse test builds them, cached.

The offline sets of daemon/dev/echo_corpus.py cut "completions" out of human
prose; a served model's own completions are shorter and odder, and echo
detection must be measured on those too (issue 26, item 5). This builds the
collapse test's served model (the demo's Llama pre-trained for 200 steps,
`daemon.dev.demo.build_base_model`), serves it with a vLLM CPU server, and
samples completions of the collapse test's prompts (12 words of English prose,
160 new tokens at temperature 0.8, one seed per 16 prompts) with
tests/curation_fixtures.py's `generate`. Model and completions are cached under
`cache` (a second run reads the file); what vLLM samples differs from machine to
machine, so the file, not the seed, is what makes a run repeatable.
"""

from __future__ import annotations

import json
from pathlib import Path

PRETRAIN_STEPS = 200  # tests/curation_fixtures.py's


def completions_file(cache: Path, n: int) -> Path:
    """`cache`/completions-N.jsonl: N sampled completions (one JSON object with a "text" per line), made if missing."""
    out = cache / f"completions-{n}.jsonl"
    if out.exists():
        return out
    from daemon.dev.demo import build_base_model
    from daemon.dev.sample_corpus import english_docs
    from daemon.dev.vllm_server import VLLMServer
    from tests.curation_fixtures import generate

    cache.mkdir(parents=True, exist_ok=True)
    model = cache / "model" / "checkpoints" / "base"
    if not (model / "config.json").exists():
        model = build_base_model(cache / "model", PRETRAIN_STEPS)
    prompts = list(dict.fromkeys(" ".join(d.split()[:12]) for d in english_docs(4 * n, 1024, seed=77)))
    if len(prompts) < n:
        raise ValueError(f"only {len(prompts)} distinct prompts for {n} completions")
    server = VLLMServer(model=str(model), served_model_name="english", max_model_len=512, log_path=cache / "vllm.log")
    server.start(timeout=600)
    try:
        texts = generate(server.url, prompts[:n], seed=5)
    finally:
        server.stop()
    tmp = out.with_suffix(".partial")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tmp.rename(out)
    return out
