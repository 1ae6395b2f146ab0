"""Score the serving checkpoint and a round's candidate checkpoints on the same data.

Adaptation is held-out loss on new documents, forgetting held-out loss on
replay documents (both via daemon/jobs/lm_loss.py, the same scorer drift uses).
Regression suites come as files: multiple-choice JSONL scored like
lm-evaluation-harness `loglikelihood` requests, and canary prompts whose
greedy continuation must not change. The serving model is scored in the same
run rather than reused from an earlier round, because the held-out sets
differ per round and only same-data numbers compare. The report is plain
JSON so it is stored with the round and read back by the gate and the API.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.jobs.lm_loss import IGNORE, mean_token_loss, token_nll
from daemon.jobs.specs import (
    CanaryResult,
    EvalReport,
    EvalSpec,
    LossSummary,
    ModelReport,
    SuiteResult,
    read_texts,
    write_result,
)
from policies.round_policy import is_harness_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from daemon.jobs.model_loader import CausalLM

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: list[str]
    answer: int


@dataclass(frozen=True)
class Canary:
    prompt: str
    expected: str
    name: str = ""


@dataclass(frozen=True)
class EvalData:
    new_docs: Sequence[str]
    replay_docs: Sequence[str]
    suites: dict[str, str] = field(default_factory=dict)  # suite name -> JSONL path
    canaries: str | None = None  # JSONL path: {"prompt", "expected", "name"?}
    max_len: int = 512
    target_delimiter: str = " "  # lm-eval-harness default between context and choice
    device: str = "auto"  # where every model is scored: the trainer's device (CUDA when present), else CPU
    base: str | None = None  # the served base checkpoint, for models that are LoRA adapters
    dtype: str | None = None  # the dtype vLLM serves in; None = each checkpoint's own


def _read_jsonl(path: str | Path) -> list[dict]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    return out


def load_mc_suite(path: str | Path) -> list[MCItem]:
    items = []
    for n, d in enumerate(_read_jsonl(path), 1):
        try:
            item = MCItem(str(d["context"]), [str(c) for c in d["choices"]], int(d["answer"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: expected {{'context', 'choices': [...], 'answer': i}}: {e!r}") from None
        if not 0 <= item.answer < len(item.choices):
            raise ValueError(f"{path}:{n}: answer {item.answer} out of range for {len(item.choices)} choices")
        items.append(item)
    return items


def load_canaries(path: str | Path) -> list[Canary]:
    return [Canary(str(d["prompt"]), str(d["expected"]), str(d.get("name") or f"canary-{i}")) for i, d in enumerate(_read_jsonl(path), 1)]


def save_canaries(canaries: Sequence[Canary], path: str | Path) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(asdict(c)) + "\n" for c in canaries), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- scoring


def load_model(
    path: str | Path, device: str = "auto", base: str | Path | None = None, dtype: str | None = None
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """A model as it is served: a full checkpoint, or a LoRA adapter on `base`, in the served dtype (default:
    the checkpoint's) on `device` (daemon/jobs/model_loader.py; safetensors only)."""
    from daemon.jobs.model_loader import DTYPES, is_adapter, load_causal_lm, load_tokenizer

    dt = DTYPES[dtype] if dtype else None
    if is_adapter(path):
        if base is None:
            raise ValueError(f"{path} is a LoRA adapter; scoring it needs the base checkpoint it is served on")
        return load_causal_lm(base, device=device, dtype=dt, adapter=path), load_tokenizer(base)
    return load_causal_lm(path, device=device, dtype=dt), load_tokenizer(path)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness `_encode_pair`: trailing context spaces move to the continuation, and the
    continuation tokens are those of the whole string after the context's, so BPE merges across
    the boundary are scored the way the model would see the full text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def loglikelihoods(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, requests: Sequence[tuple[str, str]], max_len: int = 512, batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each continuation given its context (harness `loglikelihood`), batched
    with right padding on the model's device."""
    import torch

    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    seqs: list[tuple[list[int], int]] = []  # (tokens, continuation length)
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        seq = ([bos] if bos is not None else []) + ctx + cont
        seqs.append((seq[-(max_len + 1) :], len(cont)))  # left-truncate like the harness; the continuation is kept whole
    out = [0.0] * len(seqs)
    todo = [i for i, (_, n) in enumerate(seqs) if n]
    with torch.no_grad():
        for b in range(0, len(todo), batch_size):
            idx = todo[b : b + batch_size]
            width = max(len(seqs[i][0]) - 1 for i in idx)
            inp = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                s = seqs[i][0][:-1]
                inp[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            nxt = torch.full((len(idx), width), IGNORE, dtype=torch.long)  # each position's next token
            for row, i in enumerate(idx):
                seq, n = seqs[i]
                nxt[row, len(seq) - 1 - n : len(seq) - 1] = torch.tensor(seq[-n:])  # the continuation only
            nll = token_nll(model, nxt.to(device), input_ids=inp.to(device), attention_mask=mask.to(device))
            for row, _ in enumerate(idx):
                out[idx[row]] = -float(nll[row].sum())
    return out


def score_mc(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, name: str, items: Sequence[MCItem], delimiter: str = " ", max_len: int = 512
) -> SuiteResult:
    preds, correct, correct_norm = [], 0, 0
    for it in items:
        lls = loglikelihoods(model, tokenizer, [(it.context, delimiter + c) for c in it.choices], max_len)
        p = max(range(len(lls)), key=lambda i: lls[i])
        pn = max(range(len(lls)), key=lambda i: lls[i] / max(len(it.choices[i]), 1))
        preds.append(p)
        correct += p == it.answer
        correct_norm += pn == it.answer
    n = len(items)
    return SuiteResult(name, n, correct / n if n else math.nan, correct_norm / n if n else math.nan, preds)


def greedy_continuations(model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    import torch

    bos = tokenizer.bos_token_id
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = ([bos] if bos is not None else []) + tokenizer(p, add_special_tokens=False)["input_ids"]
            inp = torch.tensor([ids], device=next(model.parameters()).device)
            # transformers decorates generate with @torch.no_grad(), which mypy reads as taking `self` twice.
            gen = model.generate(  # type: ignore[misc]
                inp,
                attention_mask=torch.ones_like(inp),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )
            text = tokenizer.decode(gen[0, len(ids) :], skip_special_tokens=False)
            assert isinstance(text, str)  # one sequence in, one string out (decode is typed for batches too)
            outs.append(text)
    return outs


def record_canaries(model_path: str | Path, prompts: Sequence[str], max_new_tokens: int = 8, device: str = "auto") -> list[Canary]:
    """Freeze the serving model's greedy continuations as canaries (how a deployment bootstraps them)."""
    model, tok = load_model(model_path, device)
    return [
        Canary(p, c, f"canary-{i}")
        for i, (p, c) in enumerate(zip(prompts, greedy_continuations(model, tok, prompts, max_new_tokens), strict=False), 1)
    ]


def check_canaries(model: CausalLM, tokenizer: PreTrainedTokenizerBase, canaries: Sequence[Canary]) -> list[CanaryResult]:
    out = []
    for c in canaries:
        n = len(tokenizer(c.expected, add_special_tokens=False)["input_ids"]) + 2
        got = greedy_continuations(model, tokenizer, [c.prompt], n)[0]
        out.append(CanaryResult(c.name, c.prompt, c.expected, got, got.startswith(c.expected)))
    return out


def _summary(model: CausalLM, tok: PreTrainedTokenizerBase, docs: Sequence[str], max_len: int) -> LossSummary:
    r = mean_token_loss(model, tok, list(docs), max_len=max_len)
    return LossSummary(r.mean_nll, math.exp(r.mean_nll) if math.isfinite(r.mean_nll) else math.nan, r.tokens)


def score_suite(model: CausalLM, tok: PreTrainedTokenizerBase, name: str, path: str, data: EvalData) -> SuiteResult:
    """A suite file is an lm-evaluation-harness task YAML (scored by lm-eval itself) or our multiple-choice JSONL."""
    if is_harness_task(path):
        from daemon.jobs.harness_suites import score_harness_task

        return score_harness_task(model, tok, path, name, max_len=data.max_len)
    return score_mc(model, tok, name, load_mc_suite(path), data.target_delimiter, data.max_len)


def score_checkpoint(path: str | Path, data: EvalData, name: str | None = None) -> ModelReport:
    t = time.monotonic()
    model, tok = load_model(path, data.device, data.base, data.dtype)
    suites = {s: score_suite(model, tok, s, p, data) for s, p in sorted(data.suites.items())}
    canaries = check_canaries(model, tok, load_canaries(data.canaries)) if data.canaries else []
    p0 = next(model.parameters())
    return ModelReport(
        name=name or Path(path).name,
        path=str(path),
        new=_summary(model, tok, data.new_docs, data.max_len),
        replay=_summary(model, tok, data.replay_docs, data.max_len),
        suites=suites,
        canaries=canaries,
        seconds=time.monotonic() - t,
        device=str(p0.device),
        dtype=str(p0.dtype if data.dtype else getattr(model.config, "dtype", p0.dtype)).removeprefix("torch."),
    )


def evaluate_round(
    round_id: str,
    serving: str | Path,
    candidates: Sequence[str | Path],
    data: EvalData,
    names: Sequence[str] | None = None,
    on_scored: Callable[[int, int, str], None] | None = None,
) -> EvalReport:
    """Score the serving checkpoint and every candidate of the round on the same held-out data.

    `on_scored(done, total, name)` is called after each model (progress for the daemon and the demo)."""
    names = list(names) if names is not None else [Path(c).name for c in candidates]
    if len(names) != len(candidates) or len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, one per checkpoint: {names}")
    total = 1 + len(candidates)
    tell = on_scored or (lambda *_: None)
    tell(0, total, "")
    serving_report = score_checkpoint(serving, data, "serving")
    tell(1, total, "serving")
    scored = []
    for c, n in zip(candidates, names, strict=False):
        scored.append(score_checkpoint(c, data, n))
        tell(1 + len(scored), total, n)
    return EvalReport(round_id=round_id, serving=serving_report, candidates=scored, created_at=time.time())


def save_report(report: EvalReport, round_dir: str | Path) -> Path:
    p = Path(round_dir) / "eval_report.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(report.to_json(), encoding="utf-8")
    return p


def main(argv: list[str] | None = None) -> None:
    """`python -m daemon.jobs.evaluator SPEC.json` (an EvalSpec): the daemon scores a round in a child process,
    like training, so a model that does not fit or a crash in scoring never takes the daemon down."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m daemon.jobs.evaluator SPEC.json")
    spec = EvalSpec.read(argv[0])
    data = EvalData(
        new_docs=read_texts(spec.new_path),
        replay_docs=read_texts(spec.replay_path),
        suites=spec.suites,
        canaries=spec.canaries,
        max_len=spec.max_len,
        device=spec.device,
        base=spec.base,
        dtype=spec.dtype,
    )
    names, paths = zip(*spec.candidates, strict=False) if spec.candidates else ((), ())
    progress = open(spec.progress_path, "a", encoding="utf-8")

    def tell(done: int, total: int, name: str) -> None:
        progress.write(json.dumps({"scored": done, "total": total, "model": name, "time": time.time()}) + "\n")
        progress.flush()

    report = evaluate_round(spec.round_id, spec.serving, list(paths), data, list(names), on_scored=tell)
    write_result(spec.result_file, json.loads(report.to_json()))


if __name__ == "__main__":
    main()
