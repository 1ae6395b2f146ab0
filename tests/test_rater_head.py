"""The `head` and `classifier` raters: `cptd rater-train` from annotations, then the rating job on documents never seen.

The annotations are derived from the labelled buffer's labels (daemon/dev/degraded_corpus.py DERIVED_RATINGS:
good prose rated high, each degradation low on the criteria it breaks), as an operator would get them from an
LLM. The served model is the curation tests' English Llama, stored in bf16 as served checkpoints are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.dev.degraded_corpus import KINDS, annotation_lines, degraded_buffer
from daemon.dev.sample_corpus import english_docs
from daemon.jobs.rater_training import auc
from daemon.jobs.specs import RaterSpec
from policies.rating import DATAMAN_CRITERIA, DATAMAN_DOMAINS

pytestmark = pytest.mark.slow


def cptd(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=timeout)


def rate(tmp: Path, backend: str, served: Path, path: Path, texts: list[str], **kw) -> list[dict]:
    docs = tmp / f"docs-{backend}.jsonl"
    docs.write_text("".join(json.dumps({"key": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    spec = RaterSpec(
        backend=backend, docs_path=str(docs), out=str(tmp / f"rated-{backend}.json"), criteria=list(DATAMAN_CRITERIA),
        domains=list(DATAMAN_DOMAINS), served=str(served), path=str(path), **kw,
    )  # fmt: skip
    r = subprocess.run([sys.executable, "-m", spec.module, str(spec.write(tmp / f"spec-{backend}.json"))], timeout=900)
    assert r.returncode == 0
    res = json.loads(spec.result_file.read_text())
    assert res["docs"] == len(texts) and [row["key"] for row in res["rows"]] == [f"d{i}" for i in range(len(texts))]
    return res["rows"]


def test_head_trained_from_labels_selects_good_documents_it_never_saw(tmp_path, english_model):
    pretrain = english_docs(400, 2048, seed=1)  # the English model's pre-training text: kept out of both sets
    train = degraded_buffer(300, 300, seed=0, exclude=pretrain)  # 600 annotations: the head's AUC needs them
    # 150 + 150 held-out documents: at 30% of 120 one degraded document moved precision by 2.8 points, and the bar
    # fell on one build of the model (0.944) and not the next (0.972) on the same code.
    test = degraded_buffer(150, 150, seed=1, exclude=pretrain + [t for t, _ in train])
    lines = [json.dumps(a) for a in annotation_lines(train)]
    lines[3:3] = ["{not json", json.dumps({"text": "no overall", "ratings": {"coherence": 3}}), json.dumps({"text": "x", "overall": 9})]
    ann = tmp_path / "annotations.jsonl"
    ann.write_text("\n".join(lines) + "\n")

    r = cptd("rater-train", "--annotations", str(ann), "--served", str(english_model), "--out", str(tmp_path / "rater"),
             "--dtype", "float32", "--max-len", "256", "--holdout", "0.1", "--json")  # fmt: skip
    assert r.returncode == 1, r.stderr  # lines were skipped, the rest used
    res = json.loads(r.stdout)
    assert [(s["line"], s["reason"].split(":")[0]) for s in res["skipped"]] == [
        (4, "invalid JSON"),
        (5, "no overall rating"),
        (6, "ratings outside 1..5"),
    ]
    assert res["valid"] == len(train) and res["heldout"] == 60 and res["agreement"]["overall_auc"] is not None
    cfg = json.loads((tmp_path / "rater" / "rater.json").read_text())
    assert cfg["lineage"]["served"] == str(english_model.resolve()) and len(cfg["lineage"]["annotations_sha256"]) == 64
    assert "coherence" in cfg["criteria"] and "creativity" not in cfg["criteria"]  # only what was rated is predicted

    texts = [t for t, _ in test] + [""]  # and one document that cannot be rated
    rows = rate(tmp_path, "head", english_model, tmp_path / "rater", texts, max_len=256)
    assert "error" in rows[-1] and all("overall" in row for row in rows[:-1])
    labels = [label for _, label in test]
    overall = [row["overall"] for row in rows[:-1]]
    good = [o for o, label in zip(overall, labels, strict=True) if label == "good"]
    per_kind = {k: auc(good, [o for o, label in zip(overall, labels, strict=True) if label == k]) for k in KINDS}
    overall_auc = auc(good, [o for o, label in zip(overall, labels, strict=True) if label != "good"])
    budget = int(0.3 * len(test))
    chosen = sorted(range(len(test)), key=lambda i: -overall[i])[:budget]
    precision = sum(labels[i] == "good" for i in chosen) / budget
    print(f"\nhead on {len(test)} held-out documents: AUC overall {overall_auc:.3f}, per kind "
          f"{ {k: round(v or 0, 3) for k, v in per_kind.items()} }; precision at a 30% budget {precision:.3f}")  # fmt: skip
    # Issue 26's bar. It holds from 600 annotations (0.953-0.974 overall, 0.91-0.97 against shuffled sentences over
    # five train/test splits here, `python -m bench.rater_quality --splits 5`; 14 of 15 splits >= 0.95 over three
    # draws, bench/README.md), not from 200 (0.918-0.945).
    assert overall_auc is not None and overall_auc >= 0.95
    assert (per_kind["shuffled"] or 0) >= 0.90
    # At most 4 degraded documents in the top 90. Over six splits on each of two builds of the English model (its
    # init seed 0, and 7 standing in for another CPU's last bits) the head let in 0-3 (precision 0.967-1.000).
    assert precision >= 0.95
    assert {row["domain"] for row in rows[:-1]} == {"technology"}


def test_rater_train_refuses_too_few_lines_and_the_classifier_backend_rates(tmp_path, english_model):
    buf = degraded_buffer(12, 12, seed=4)
    ann = tmp_path / "annotations.jsonl"
    ann.write_text("".join(json.dumps(a) + "\n" for a in annotation_lines(buf[:5])))
    r = cptd("rater-train", "--annotations", str(ann), "--served", str(english_model), "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and "refused: 5 valid annotation lines" in r.stderr
    assert not (tmp_path / "none").exists()

    ann.write_text("".join(json.dumps(a) + "\n" for a in annotation_lines(buf)))
    r = cptd("rater-train", "--annotations", str(ann), "--served", str(english_model), "--out", str(tmp_path / "clf"),
             "--backend", "classifier", "--epochs", "1", "--max-len", "64", "--min-annotations", "10")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "classifier rater written" in r.stdout and "overall" in r.stdout
    rows = rate(tmp_path, "classifier", english_model, tmp_path / "clf", [t for t, _ in buf[:4]], max_len=64, dtype="bfloat16")
    for row in rows:
        assert 1 <= row["overall"] <= 5 and set(row["criteria"]) >= {"overall", "coherence"} and row["domain"] == "technology"


def test_the_report_says_when_a_head_is_short_of_ratings():
    from daemon.rater_train import FEW_LINES, report

    res = {"backend": "head", "out_dir": "/r", "device": "cpu", "seconds": 3.0, "valid": 200, "train": 180, "heldout": 20, "skipped": []}
    assert "note: 180 lines to fit from" in report(res)
    assert "note:" not in report({**res, "train": FEW_LINES}) and "note:" not in report({**res, "backend": "classifier"})
