"""Regression suites as lm-evaluation-harness task YAMLs (daemon/jobs/harness_suites.py), on a tiny local Llama.

The task below is written so lm-eval issues exactly the requests our own scorer does (context = `context`,
continuation = " " + choice), so both must pick the same choice for every doc. lm-eval encodes text with the
tokenizer's own special-token setting and our scorer always prepends BOS, so the comparison uses a tokenizer
that adds BOS itself, as real Llama tokenizers do.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest

from daemon.dev.tiny_model import build_tiny_llama
from daemon.jobs.evaluator import MCItem, score_mc
from daemon.jobs.harness_suites import score_harness_task
from policies.round_policy import is_harness_task

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the sun is hot today",
    "birds fly over the sea",
    "we drink cold water",
    "my friend reads a book",
    "the train left the station",
    "rain falls on the roof",
]

TASK_YAML = """\
task: tiny_continue
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
{extra}"""


def _docs() -> list[dict]:
    """Choose the word that ends a corpus sentence; the right answer at position 0, 1, 2 in turn."""
    last = [s.rsplit(" ", 1)[1] for s in SENTENCES]
    docs = []
    for i, s in enumerate(SENTENCES):
        context, answer = s.rsplit(" ", 1)
        choices = [last[(i + 1) % 8], last[(i + 3) % 8], last[(i + 5) % 8]]
        choices.insert(i % 3, answer)
        docs.append({"context": context, "choices": choices, "answer": i % 3})
    return docs


def write_task(d: Path, data: str = "./data.jsonl", output_type: str = "multiple_choice", extra: str = "", write_data: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if write_data:
        (d / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in _docs()), encoding="utf-8")
    p = d / "task.yaml"
    p.write_text(TASK_YAML.format(data=data, output_type=output_type, extra=extra), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny"), SENTENCES * 5, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    # BOS from the tokenizer itself, like a Llama tokenizer (the tiny one adds none), so lm-eval and score_mc see the same ids
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("the cat")["input_ids"][0] == tok.bos_token_id
    return model, tok


@pytest.fixture
def offline(monkeypatch):
    """Offline env vars set, and any socket connection outside loopback fails: a download attempt cannot pass."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not isinstance(address, (str, bytes)):
            raise OSError(f"network access attempted during a harness suite: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def test_harness_task_scores_what_our_scorer_scores(tiny, tmp_path, monkeypatch, offline):
    model, tok = tiny
    task = write_task(tmp_path / "suite")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./data.jsonl here: relative data_files follow the YAML, not the cwd
    env_before = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}

    got = score_harness_task(model, tok, task, "tiny")

    assert got.name == "tiny" and got.n == 8
    assert 0.0 <= got.accuracy <= 1.0 and 0.0 <= got.accuracy_norm <= 1.0
    ours = score_mc(model, tok, "tiny", [MCItem(d["context"], d["choices"], d["answer"]) for d in _docs()], delimiter=" ")
    assert got.predictions == ours.predictions
    assert got.accuracy == ours.accuracy
    assert got.accuracy_norm == ours.accuracy_norm
    assert {k: os.environ.get(k) for k in env_before} == env_before  # offline mode is put back after the call

    assert score_harness_task(model, tok, task, "tiny", limit=3).n == 3


def test_bf16_and_peft_models_score_in_place(tiny, tmp_path, offline):
    import torch
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    task = write_task(tmp_path / "suite")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    got = score_harness_task(bf16, tok, task, "tiny", batch_size=3)
    assert got.n == 8 and 0.0 <= got.accuracy <= 1.0
    assert next(bf16.parameters()).dtype == torch.bfloat16  # dtype and device left as the caller had them
    assert next(bf16.parameters()).device.type == "cpu"

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert score_harness_task(lora, tok, task, "tiny").n == 8


def test_missing_data_file_names_it(tiny, tmp_path):
    task = write_task(tmp_path / "suite", data="./gone.jsonl")
    with pytest.raises(ValueError, match=r"task\.yaml.*data file not found: .*gone\.jsonl"):
        score_harness_task(*tiny, task, "tiny")


def test_bad_yamls_raise_value_errors_naming_the_file(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"nope\.yaml.*not found"):
        score_harness_task(*tiny, tmp_path / "nope.yaml", "x")

    unknown = write_task(tmp_path / "unknown", extra="no_such_key: 1\n")
    with pytest.raises(ValueError, match=r"unknown/task\.yaml.*could not load.*no_such_key"):
        score_harness_task(*tiny, unknown, "x")

    gen = write_task(tmp_path / "gen", output_type="generate_until")
    with pytest.raises(ValueError, match=r"gen/task\.yaml.*tiny_continue.*generate_until"):
        score_harness_task(*tiny, gen, "x")

    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.yaml"):
        score_harness_task(*tiny, broken, "x")

    hub = tmp_path / "hub.yaml"
    hub.write_text("task: h\ndataset_path: someorg/somedata\noutput_type: multiple_choice\ntest_split: test\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hub\.yaml.*fetched from the hub"):
        score_harness_task(*tiny, hub, "x")


def test_suite_kind_is_told_by_extension():
    assert is_harness_task("suites/arc.yaml") and is_harness_task("X.YML")
    assert not is_harness_task("suites/arc.jsonl")
