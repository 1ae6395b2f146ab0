"""`cptd rater-train --annotations FILE.jsonl`: fit the `head` or `classifier` rater to pointwise ratings, as a job.

The fitting needs the served model (its hidden states, or its weights to
fine-tune), so it runs as a job (daemon/jobs/rater_training.py) where the
trainer runs, like `calibrate-detector`. This side only builds the spec, waits
and reports: the skipped lines with their numbers and reasons, the held-out
agreement, and where the rater was written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemon.cli_exit import CliError, Exit
from daemon.job_launchers import Job, JobFailed, run_to_end
from daemon.jobs.specs import RaterTrainSpec
from policies.rating import DATAMAN_CRITERIA, DATAMAN_DOMAINS

# Below this many training lines a head is short of ratings: on the labelled buffer its AUC on unseen documents was
# 0.918-0.945 from 200 lines and 0.940-0.991 from 600 (docs/curation.md, Trained raters).
FEW_LINES = 500


def rater_train(a: argparse.Namespace) -> dict[str, Any]:
    """The job's result; CliError when a file is missing or the job fails."""
    if not Path(a.annotations).is_file():
        raise CliError(f"--annotations {a.annotations}: no such file")
    served = a.served
    if served is None:
        from daemon.settings import Settings

        served = str(Settings().base_checkpoint_path())
    if not (Path(served) / "config.json").is_file():
        raise CliError(f"--served {served}: not a checkpoint directory (no config.json)")
    criteria, domains, scale = list(DATAMAN_CRITERIA), list(DATAMAN_DOMAINS), a.scale
    if a.policy:
        from policies.config import PolicyError, load_policy

        try:
            rater = load_policy(a.policy).curation.rater  # the policy's own schema
        except PolicyError as e:
            raise CliError(f"--policy {a.policy}: {e}") from None
        criteria, domains, scale = list(rater.criteria), list(rater.domains), rater.scale
    with tempfile.TemporaryDirectory(prefix="cptd-rater-train-") as tmp:
        spec = RaterTrainSpec(
            annotations=str(Path(a.annotations).resolve()), served=str(Path(served).resolve()), adapter=a.adapter,
            out_dir=str(Path(a.out or Path(served) / "rater").resolve()), result_path=str(Path(tmp) / "result.json"),
            backend=a.backend, criteria=criteria, domains=domains, scale=scale, holdout=a.holdout, seed=a.seed,
            epochs=a.epochs, lr=a.lr, hidden=a.hidden, max_len=a.max_len, batch_size=a.batch_size, device=a.device, dtype=a.dtype,
            min_annotations=a.min_annotations,
        )  # fmt: skip
        try:
            return dict(run_to_end(Job(spec, Path(tmp) / "spec.json", Path(tmp) / "rater-train.log")))
        except JobFailed as e:
            raise CliError(f"the rater-train job failed: {e}") from None


def cmd_rater_train(a: argparse.Namespace) -> int:
    """Exit 0: a rater written; 1 when lines were skipped (the rest used); 2 when refused (too few valid lines)."""
    res = rater_train(a)
    if a.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for s in res["skipped"][:50]:
            print(f"  line {s['line']}: {s['reason']}", file=sys.stderr)
        if len(res["skipped"]) > 50:
            print(f"  ... {len(res['skipped']) - 50} more skipped lines", file=sys.stderr)
        if res["refusal"] is None:
            print(report(res))
    if res["refusal"] is not None:
        raise CliError(f"refused: {res['refusal']}", Exit.BAD_INPUT)
    return 1 if res["skipped"] else 0


def report(res: dict[str, Any]) -> str:
    ag = res.get("agreement") or {}
    lines = [
        f"{res['backend']} rater written to {res['out_dir']} ({res['device']}, {res['seconds']:.0f} s): "
        f"{res['valid']} valid lines, {res['train']} trained on, {res['heldout']} held out, {len(res['skipped'])} skipped"
    ]
    if res["backend"] == "head" and res["train"] < FEW_LINES:
        lines.append(f"note: {res['train']} lines to fit from; a head gains from more ratings up to several hundred (docs/curation.md)")
    if ag:
        lines.append(f"held-out agreement ({ag['heldout']} documents):")
        for c, m in ag["criteria"].items():
            lines.append(f"  {c:28s} MAE {m['mae']:.3f}  rounded accuracy {m['accuracy']:.1%}  (n {m['n']})")
        if ag.get("domain_accuracy") is not None:
            lines.append(f"  domain accuracy {ag['domain_accuracy']:.1%}")
        if ag.get("overall_auc") is not None:
            lines.append(f"  overall AUC, rated above the middle vs the rest: {ag['overall_auc']:.3f}")
    return "\n".join(lines)
