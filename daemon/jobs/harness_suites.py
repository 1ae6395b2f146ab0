"""Regression suites kept as lm-evaluation-harness tasks, scored by lm-eval itself.

Users keep their benchmarks as lm-evaluation-harness (`lm-eval`) task YAMLs, so a
suite may be one of those instead of our multiple-choice JSONL. Such a suite is
loaded and scored by lm-eval's own machinery (its YAML loader, `ConfigurableTask`,
`HFLM` around the model we already hold, `simple_evaluate`) rather than
re-implemented here: the numbers the gate compares are then the numbers users
see when they run lm-eval on the same task elsewhere, prompt templates, filters,
few-shot sampling and metric definitions included.

Three things are ours, not lm-eval's:
- relative paths in `dataset_kwargs` (`data_files`, `data_dir`) and a relative
  local `dataset_path` are resolved against the YAML's directory: lm-eval hands
  `dataset_kwargs` to `datasets.load_dataset` unchanged, which would resolve them
  against the process's working directory (the round dir, not the suite's);
- nothing is downloaded: the Hugging Face hub and datasets are put in offline
  mode for the call, and the task's data must be local files;
- a task that cannot be loaded (missing YAML or data file, keys lm-eval refuses,
  a group instead of one task, an output type other than multiple_choice) raises
  ValueError naming the YAML and the cause, not a traceback from inside lm-eval.

lm_eval, datasets and torch are imported inside the function: this module is
imported by the evaluator child only, and importing it stays cheap.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.jobs.specs import SuiteResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from daemon.jobs.model_loader import CausalLM

SUPPORTED_OUTPUT_TYPES = ("multiple_choice",)
_DEFAULT_OUTPUT_TYPE = "generate_until"  # lm_eval.config.task.TaskConfig's default when a YAML names none
_OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF hub and datasets offline for the duration: the env vars for modules imported inside, and the module
    constants of those already imported (huggingface_hub and datasets read the variables once, at import)."""
    import sys

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    patched: list[tuple[Any, str, Any]] = []
    for mod_name, attrs in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(mod_name)
        for attr in attrs:
            if mod is not None and hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """simple_evaluate seeds python, numpy and torch globally (as the lm-eval CLI does); put their states back."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _resolve_local(value: Any, base: Path, yaml_path: Path, what: str) -> Any:
    """A data file path (or list / split dict of them) made absolute against the YAML's directory; each must exist."""
    if isinstance(value, dict):
        return {k: _resolve_local(v, base, yaml_path, f"{what}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve_local(v, base, yaml_path, what) for v in value]
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{yaml_path}: dataset_kwargs.{what} must be a path, a list of paths or a split -> path(s) mapping, got {value!r}")
    s = str(value)
    if "://" in s:
        raise ValueError(
            f"{yaml_path}: dataset_kwargs.{what} is a remote URL ({s}); suites must use local data files (nothing is downloaded)"
        )
    p = Path(s).expanduser()
    p = p if p.is_absolute() else (base / p)
    if glob.has_magic(str(p)):
        if not glob.glob(str(p), recursive=True):
            raise ValueError(f"{yaml_path}: dataset_kwargs.{what}: no file matches {p}")
    elif not p.exists():
        raise ValueError(f"{yaml_path}: dataset_kwargs.{what}: data file not found: {p}")
    return str(p)


def _task_config(yaml_path: Path) -> dict[str, Any]:
    """The YAML through lm-eval's own loader (`include:` and `!function` resolved next to the YAML), with local
    data paths made absolute against the YAML's directory and checked to exist."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(yaml_path, resolve_func=True)
    except Exception as e:  # yaml.YAMLError, a missing include or !function module, ...
        raise ValueError(f"{yaml_path}: not a loadable lm-eval task YAML: {type(e).__name__}: {e}") from e
    if "group" in cfg or not isinstance(cfg.get("task"), str):
        raise ValueError(f"{yaml_path}: expected one lm-eval task (a `task: NAME` string), not a group or task list")
    if "class" in cfg:
        raise ValueError(f"{yaml_path}: python-class tasks (`class:`) are not supported; use a ConfigurableTask YAML")
    output_type = cfg.get("output_type", _DEFAULT_OUTPUT_TYPE)
    if output_type not in SUPPORTED_OUTPUT_TYPES:
        raise ValueError(
            f"{yaml_path}: task {cfg['task']!r} has output_type {output_type!r}; only {', '.join(SUPPORTED_OUTPUT_TYPES)} is supported"
        )
    if cfg.get("custom_dataset") is not None:
        raise ValueError(f"{yaml_path}: custom_dataset is not supported; use dataset_path + dataset_kwargs.data_files")

    base = yaml_path.parent
    dataset_path = cfg.get("dataset_path")
    if not isinstance(dataset_path, str) or not dataset_path:
        raise ValueError(f"{yaml_path}: task {cfg['task']!r} has no dataset_path")
    local = Path(dataset_path).expanduser()
    is_local = dataset_path.startswith((".", "/", "~")) or (base / local).exists()  # a local folder or script, not a builder name
    if is_local:
        local = local if local.is_absolute() else base / local
        if not local.exists():
            raise ValueError(f"{yaml_path}: dataset_path not found: {local}")
        cfg["dataset_path"] = str(local)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if kwargs.get(key) is not None:
            kwargs[key] = _resolve_local(kwargs[key], base, yaml_path, key)
    if not is_local and kwargs.get("data_files") is None and kwargs.get("data_dir") is None:
        raise ValueError(
            f"{yaml_path}: dataset_path {dataset_path!r} with no dataset_kwargs.data_files/data_dir would be fetched from the hub; "
            "suites must use local data (e.g. dataset_path: json + dataset_kwargs: {data_files: {test: ./data.jsonl}})"
        )
    cfg["dataset_kwargs"] = kwargs
    return cfg


def score_harness_task(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    task_yaml: str | Path,
    name: str,
    batch_size: int = 8,
    max_len: int = 512,
    limit: int | None = None,
) -> SuiteResult:
    """Score one lm-eval task YAML on a loaded model: accuracy = the task's `acc`, accuracy_norm = its `acc_norm`
    (`acc` when it reports none), n = docs scored, predictions = argmax log-likelihood choice per doc.

    `model` is a transformers causal LM (or a peft PeftModel around one) as the caller loaded it: its device and
    dtype are left alone. `max_len` is lm-eval's max_length (contexts are left-truncated to it)."""
    yaml_path = Path(task_yaml).expanduser().resolve()
    if not yaml_path.is_file():
        raise ValueError(f"{task_yaml}: lm-eval task YAML not found")

    with _offline():
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        cfg = _task_config(yaml_path)
        task_name = cfg["task"]
        with tempfile.TemporaryDirectory(prefix="cptd-harness-") as cache_dir:
            # a private datasets cache: the Arrow copy of the suite's files is rebuilt per call and never left behind
            cfg["dataset_kwargs"].setdefault("cache_dir", cache_dir)
            # include_defaults=False: indexing lm-eval's ~10k bundled task YAMLs costs seconds, and only this one is run
            tm = TaskManager(include_defaults=False)
            try:
                loaded = tm.load([cfg])
            except Exception as e:  # TaskConfig refusing a key, datasets failing to read the files, ...
                raise ValueError(f"{yaml_path}: lm-eval could not load task {task_name!r}: {type(e).__name__}: {e}") from e
            task = loaded["tasks"].get(task_name)
            if task is None:
                raise ValueError(f"{yaml_path}: lm-eval loaded no task named {task_name!r} (got {sorted(loaded['tasks'])})")
            if task.OUTPUT_TYPE not in SUPPORTED_OUTPUT_TYPES:
                raise ValueError(f"{yaml_path}: task {task_name!r} has output_type {task.OUTPUT_TYPE!r}; only multiple_choice is supported")

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_len)
            with _rng_preserved():
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task],
                    task_manager=tm,  # without it simple_evaluate builds a default TaskManager (the full index) again
                    limit=limit,
                    bootstrap_iters=0,  # no stderr: the gate compares point estimates
                    log_samples=True,  # per-doc log-likelihoods, for predictions (no verbosity=: it reconfigures logging)
                )
    if not out or task_name not in out.get("results", {}):
        raise ValueError(f"{yaml_path}: lm-eval returned no results for task {task_name!r}")
    metrics = out["results"][task_name]

    def metric(key: str) -> float | None:
        hits = [v for k, v in metrics.items() if k.split(",")[0] == key and not k.endswith("_stderr")]
        return float(hits[0]) if hits else None

    acc = metric("acc")
    if acc is None:
        raise ValueError(f"{yaml_path}: task {task_name!r} reports no `acc` (metrics: {sorted(metrics)}); the gate compares accuracy")
    acc_norm = metric("acc_norm")
    samples = out.get("samples", {}).get(task_name, [])
    samples = sorted(samples, key=lambda s: s["doc_id"])
    preds = [max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0])) for s in samples]
    n = int(out.get("n-samples", {}).get(task_name, {}).get("effective", len(samples)))
    return SuiteResult(name, n, acc, acc if acc_norm is None else acc_norm, preds)
