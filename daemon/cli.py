"""`cptd` — the operator's command line.

Commands that inspect or steer a running daemon talk to its HTTP API
(--url, default $CPTD_URL or http://127.0.0.1:8080); the rest run locally.
Tables for people by default, --json for scripts. Every error is one line on
stderr (with --json: {"error": message} on stdout) and an exit code of EXIT,
never a traceback: scripts and workflow steps (Airflow, Argo) branch on the code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from daemon import round_wait
from daemon.cli_exit import EXIT, ApiError, CliError, Exit, say_error
from daemon.round_record import RoundRecord

if TYPE_CHECKING:
    from pathlib import Path

    from connectors.redis_store import RedisStore
    from daemon.settings import Settings
    from policies.config import Policy


def _print_status(st: dict[str, Any]) -> None:
    ing = st.get("ingest", {})
    print(f"deployment  {st.get('name')}   policy {st.get('policy_hash')}   up {st.get('uptime_s')} s")
    print(
        f"ingest      {'paused (' + ing['paused'] + ')' if ing.get('paused') else 'running'}   "
        f"partitions {', '.join(ing.get('assigned') or []) or '-'}   batches {ing.get('batches')}"
    )
    if "redis_error" in st:
        print(f"redis       UNREACHABLE: {st['redis_error']}")
        return
    if op := ing.get("operator_pause"):
        print(f"            paused for every daemon by {op.get('by')} at {_ts(op.get('at'))} (POST /ingest/resume to any daemon lifts it)")
    b = st.get("buffer", {})
    print(
        f"buffer      {b.get('buffer_docs', 0):,} docs   {b.get('buffer_bytes', 0) / 1e6:,.1f} MB   "
        f"dedup keys exact {b.get('exact_keys', 0):,} / lsh {b.get('lsh_keys', 0):,}"
    )
    pv = st.get("provenance", {})
    print(
        f"provenance  human {pv.get('human', 0):,}   unknown {pv.get('unknown', 0):,}   synthetic {pv.get('synthetic', 0):,}   "
        f"echo index {pv.get('echo_index', 0):,} completions"
    )
    rp = st.get("replay", {})
    print(f"replay      {rp.get('replay_docs', 0):,} / {rp.get('cap', 0):,} docs (reservoir over {rp.get('replay_seen', 0):,} seen)")
    rd = st.get("rounds") or {}
    if rd.get("redis_loss"):
        print(f"REDIS LOST DATA  {rd['redis_loss']['cause']}\n  what to do: {rd['redis_loss']['action']}")
    if not rd.get("enabled", True):
        print(f"rounds      disabled: {rd.get('disabled_reason')}")
    elif rd:
        role = "leader" if rd.get("leader") else f"standby (lease held by {rd.get('lease_holder')})"
        latest = rd.get("latest") or {}
        print(
            f"rounds      {role}, epoch {rd.get('epoch')}   latest {latest.get('id', '-')} {latest.get('state', '')}"
            + (f"   active {rd['active']}" if rd.get("active") else "")
        )
        cur = latest.get("curation") or {}
        if cur:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in (cur.get("provenance") or {}).items())
            print(
                f"curation    {cur.get('chosen_docs', 0):,} of {cur.get('pool_docs', 0):,} chosen   dropped {cur.get('dropped') or {}}   "
                f"new data {shares or '-'} (synthetic cap {cur.get('synthetic_cap', 0):.0%})"
            )
        sv = rd.get("serving") or {}
        if sv:
            reps = ", ".join(f"{u} {r['version']} ({r['status']})" for u, r in sv.get("replicas", {}).items())
            print(f"serving     {sv.get('desired_version')} (rollback target {sv.get('previous_version')})   {reps}")
            if sv.get("route_model"):
                kept = ", ".join(sv.get("lora_versions") or []) or "none"
                print(f"clients     send model {sv['route_model']!r}   (LoRA adapters kept: {kept})")
        for j in rd.get("triggers") or []:
            print(f"trigger     {j['id']:<9} next {j.get('next_run_time') or '-'}")
    c = st.get("counts", {})
    print(f"\n{'outcome:reason':<40} {'messages':>12}")
    for k, n in c.get("by_reason", {}).items():
        print(f"{k:<40} {n:>12,}")
    print(f"{'total':<40} {c.get('total', 0):>12,}")


def cmd_validate_policy(a: argparse.Namespace) -> int:
    from policies.config import PolicyError, load_policy, policy_hash

    try:
        p = load_policy(a.file)
    except PolicyError as e:
        raise CliError(f"invalid policy: {e}", Exit.NO) from None
    from policies.quality import generic_profile_languages

    generic = generic_profile_languages(p.quality)  # languages judged by their script's rules, not a profile of their own
    if a.json:
        out = {"valid": True, "hash": policy_hash(p), "generic_language_profiles": generic, "policy": p.model_dump(mode="json")}
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.file}: valid (hash {policy_hash(p)}, deployment {p.name!r})")
    for lang, script in generic.items():
        print(
            f"warning: quality.language.languages: {lang!r} has no profile; judged by the generic {script} script profile "
            f"(derive one: cptd calibrate-language --lang {lang} --sample FILE)",
            file=sys.stderr,
        )
    return 0


def cmd_calibrate_language(a: argparse.Namespace) -> int:
    from policies.language_calibration import calibrate_profile, read_sample

    try:
        print(calibrate_profile(a.lang, read_sample(a.sample), tail=a.tail).yaml(), end="")
    except (OSError, ValueError) as e:
        raise CliError(f"calibrate-language: {e}", Exit.BAD_INPUT) from None
    return 0


def _api(a: argparse.Namespace, method: str, path: str, body: dict | None = None, timeout: float = 30) -> Any:
    """One call to a running daemon; mutating calls send the token from $CPTD_API_TOKEN or $CPTD_API_TOKEN_FILE."""
    import httpx

    headers = {}
    token = os.environ.get("CPTD_API_TOKEN")
    if not token and os.environ.get("CPTD_API_TOKEN_FILE"):
        try:
            token = open(os.environ["CPTD_API_TOKEN_FILE"]).read().strip()
        except OSError as e:
            raise CliError(f"CPTD_API_TOKEN_FILE {os.environ['CPTD_API_TOKEN_FILE']}: {e.strerror}") from None
    if method != "GET" and token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        r = httpx.request(method, a.url.rstrip("/") + path, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise ApiError(f"cannot reach cptd at {a.url}: {e}") from None
    try:
        data = r.json()
    except ValueError:
        data = {"error": r.text}
    if r.status_code >= 400:
        raise ApiError(f"cptd answered {r.status_code}: {data.get('error', data) if isinstance(data, dict) else data}", r.status_code)
    return data


def _post_refusable(a: argparse.Namespace, path: str, body: dict[str, Any]) -> Any:
    """A POST the daemon may refuse because it contradicts the state (409): that refusal is Exit.REFUSED."""
    try:
        return _api(a, "POST", path, body)
    except ApiError as e:
        if e.status == 409:
            raise CliError(str(e), Exit.REFUSED) from None
        raise


def cmd_status(a: argparse.Namespace) -> int:
    st = _api(a, "GET", "/status")
    print(json.dumps(st, indent=2)) if a.json else _print_status(st)
    return 0


def _ts(t: float | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


_GATE_WORD: dict[bool | None, str] = {True: "pass", False: "fail"}


def _print_rounds(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'round':<8} {'state':<12} {'trigger':<9} {'started':<19} {'docs':>6} {'tokens':>9} {'drift':>6} {'replay':>6} "
        f"{'steps':>9} {'gate':<6} error"
    )
    for r in rows:
        steps = f"{r['step'] or 0}/{r['total_steps']}" if r.get("total_steps") else "-"
        gate = _GATE_WORD.get(r.get("gate"), "-")
        print(
            f"{r['id']:<8} {r['state']:<12} {r['trigger']:<9} {_ts(r['created_at']):<19} {_f(r.get('docs'), ','):>6} "
            f"{_f(r.get('tokens_estimate'), ','):>9} {_f(r.get('drift_score'), '.2f'):>6} {_f(r.get('replay_ratio'), '.2f'):>6} "
            f"{steps:>9} {gate:<6} {r.get('error') or ''}"
        )


def print_round(rec: RoundRecord) -> None:
    """The lineage of one round, for people (the same record --json prints whole)."""
    print(f"round {rec.id}  {rec.state.value}   trigger {rec.trigger.kind} ({rec.trigger.reason})   policy {rec.policy_hash}")
    print(f"  parent      {rec.parent.version}  {rec.parent.checkpoint}")
    for ph, t in sorted(rec.phases.items(), key=lambda kv: kv[1].started_at):
        dur = f"{t.finished_at - t.started_at:.1f} s" if t.finished_at is not None else "..."
        print(f"  {ph.value:<11} {_ts(t.started_at)}  {dur}")
    if snap := rec.snapshot:
        print(
            f"  data        {snap.docs:,} docs ({snap.train_docs:,} trained, {snap.heldout_docs:,} held out), "
            f"~{snap.tokens_estimate:,} tokens, manifest sha256 {snap.manifest_sha256[:16]}"
        )
        for tp, o in snap.kafka_offsets.items():
            print(f"              {tp}: offsets {o.first}..{o.last} ({o.docs} docs)")
    if d := rec.drift:
        st = d.stats
        print(
            f"  drift       score {_f(d.score, '.3f')} ({d.level})  ppl gap {_f(st.ppl_gap if st else None, '.3f')}  "
            f"JS {_f(st.js_distance if st else None, '.3f')}  -> replay {rec.replay_ratio or 0:.2f}, peak LR {d.peak_lr:.2e}"
        )
    if sc := rec.schedule:
        print(f"  schedule    {sc.kind}  peak {sc.peak_lr:.2e}  warmup {sc.warmup_frac:.2%}")
    if tr := rec.train:
        p = tr.progress
        print(
            f"  training    step {p.step or 0}/{p.total_steps or '?'}  loss {_f(p.loss, '.3f')}  "
            f"lr {_f(p.lr, '.2e')}  {_f(p.tokens_per_s, ',.0f')} tok/s  (from {p.init_from or '-'})"
        )
    if ev := rec.eval:
        print(f"  eval        serving  new {_f(ev.serving.new_nll, '.3f')}  replay {_f(ev.serving.replay_nll, '.3f')}")
        for c in ev.candidates:
            print(f"              {c.name:<8} new {_f(c.new_nll, '.3f')}  replay {_f(c.replay_nll, '.3f')}")
    if g := rec.gate:
        print(f"  gate        {'ACCEPTED ' + str(g.chosen) if g.accepted else 'REJECTED'}")
        for r in g.reasons:
            print(f"              [{r.code}] {r.checkpoint + ': ' if r.checkpoint else ''}{r.message}")
    if ap := rec.approval:
        how = f"{ap.decision} by {ap.by or '-'} at {_ts(ap.at)}" if ap.decision else f"waiting until {_ts(ap.deadline)}"
        print(f"  approval    {how}" + (f": {ap.note}" if ap.note else ""))
    if sh := rec.shadow:
        print(f"  shadow      would have deployed {sh.version} ({sh.kind}) to {len(sh.replicas)} replica(s) serving {sh.serving_version}")
    if dp := rec.deploy:
        print(f"  deploy      {'ok' if dp.ok else 'FAILED'}  pause max {_f(dp.pause_seconds_max, '.3f')} s  at {_ts(rec.deployed_at)}")
        if dp.route_model:
            print(f"  clients     send model {dp.route_model!r} (LoRA adapter)")
    if rb := rec.rollback:
        print(f"  rollback    to {rb.to} ({rb.trigger}) at {_ts(rb.at)}")
    if rec.error:
        print(f"  error       {rec.error}")


def cmd_rounds(a: argparse.Namespace) -> int:
    if a.round:
        rec = _api(a, "GET", f"/rounds/{a.round}")
        print(json.dumps(rec, indent=2)) if a.json else print_round(RoundRecord.model_validate(rec))
        return 0
    rows = _api(a, "GET", f"/rounds?limit={a.limit}")
    print(json.dumps(rows, indent=2)) if a.json else _print_rounds(rows)
    return 0


def cmd_round(a: argparse.Namespace) -> int:
    """One round's lineage; with --wait, its end (the exit code says which: Exit)."""
    if a.wait:
        return round_wait.wait_round(a, _getter(a), a.round, round_wait.deadline(a))
    rec = _api(a, "GET", f"/rounds/{a.round}")
    print(json.dumps(rec, indent=2)) if a.json else print_round(RoundRecord.model_validate(rec))
    return 0


def cmd_trigger(a: argparse.Namespace) -> int:
    """Exit 0 when a round started (or the request was queued for the lease holder), Exit.REFUSED when none did;
    with --wait, how the round ended."""
    until = round_wait.deadline(a)
    out = _post_refusable(a, "/rounds", {"reason": a.reason})  # 409: rounds disabled, or the request contradicts the state
    if not (a.wait and a.json):  # --wait --json prints one object: the end
        _say_triggered(a, out)
    if a.wait and out.get("queued"):
        out = round_wait.await_answer(a, _getter(a), out, until)
        if out is None:
            return Exit.TIMEOUT
        if not a.json:
            _say_triggered(a, out)
    if not out.get("round"):
        if a.wait and a.json:
            print(json.dumps({"round": None, "refused": out.get("refused"), "exit": int(Exit.REFUSED), "outcome": "REFUSED"}))
        return Exit.OK if out.get("queued") else Exit.REFUSED
    return round_wait.wait_round(a, _getter(a), out["round"], until) if a.wait else Exit.OK


def _say_triggered(a: argparse.Namespace, out: dict[str, Any]) -> None:
    if a.json:
        print(json.dumps(out))
    elif out.get("round"):
        print(f"round {out['round']} started" + (f" ({out['note']})" if out.get("note") else ""), flush=True)
    elif out.get("refused"):
        print(f"no round started: {out['refused']}")
    else:
        print(f"request {out['request_id']} queued for the lease holder {out.get('lease_holder')!r}", flush=True)


def _getter(a: argparse.Namespace) -> round_wait.Get:
    return lambda path: _api(a, "GET", path)


def cmd_cancel(a: argparse.Namespace) -> int:
    out = _api(a, "POST", f"/rounds/{a.round}/cancel")
    print(json.dumps(out)) if a.json else print(f"cancel requested for round {a.round} (was {out['state']})")
    return 0


def cmd_decide(a: argparse.Namespace) -> int:
    """`cptd approve ID` / `cptd reject ID`: the operator's decision on a round waiting in AWAITING_APPROVAL.
    Exit.REFUSED (with the round's state named) when the round is not waiting, or another decision came first."""
    import getpass
    import socket

    by = a.by or f"{getpass.getuser()}@{socket.gethostname()}"
    out = _post_refusable(a, f"/rounds/{a.round}/{a.cmd}", {"by": by, "note": a.note})
    print(json.dumps(out)) if a.json else print(f"round {a.round} {out['decision']}: the lease holder acts on it within a second")
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    out = _api(a, "POST", "/rollback", {"to": a.round}, timeout=600)
    if a.json:
        print(json.dumps(out))
    else:
        if out.get("queued"):
            print(f"rollback queued for the lease holder {out.get('lease_holder')} (request {out.get('request_id')}); see cptd status")
        else:
            print(f"rolled back from {out['from']} to {out['to']}" if out["ok"] else f"rollback FAILED: {out['error']}")
    return 0 if out["ok"] or out.get("queued") else 1


def cmd_run(a: argparse.Namespace) -> int:
    from daemon import logs
    from daemon.app import run
    from daemon.settings import Settings

    s = Settings() if a.policy is None else Settings(policy=a.policy)
    policy = _load_policy(s.policy)  # refused in one line before anything starts (run() reads it again)
    if (why := s.policy_refusal(policy)) is not None:
        raise CliError(f"invalid policy for this deployment: {why}")
    logs.setup(s.log_level)
    return run(s)


def _load_policy(path: Path | str) -> Policy:
    from policies.config import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as e:
        raise CliError(f"invalid policy: {e}") from None


def _policy_store(a: argparse.Namespace) -> tuple[Settings, Policy, RedisStore]:
    """The settings, the policy in force (from `a.policy` or $CPTD_POLICY) and the deployment's Redis store; CliError
    when the policy file is invalid."""
    from connectors.redis_store import RedisStore, connect
    from daemon.settings import Settings

    s = Settings() if a.policy is None else Settings(policy=a.policy)
    policy = _load_policy(s.policy)
    return s, policy, RedisStore(connect(s.redis_url.get_secret_value(), **s.redis_options()), policy.name)


def _file_policy_store(a: argparse.Namespace) -> tuple[Path, Policy, RedisStore]:
    """What the file-loading commands share: the policy in force, `a.file`, and the deployment's Redis store."""
    from pathlib import Path

    _, policy, store = _policy_store(a)
    path = Path(a.file)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    return path, policy, store


def cmd_index_echoes(a: argparse.Namespace) -> int:
    """Exit 0: all lines indexed; 1: some lines invalid (named, the rest indexed); 2: nothing could be read."""
    from daemon.index_echoes import index_echoes

    path, policy, store = _file_policy_store(a)
    rep = index_echoes(path, store, policy)
    out = {"lines": rep.lines, "indexed": rep.indexed, "invalid": len(rep.invalid), "echo_index": store.provenance_counts()["echo_index"]}
    if a.json:
        print(json.dumps({**out, "invalid_lines": [{"line": n, "reason": r, "detail": d} for n, r, d in rep.invalid]}))
    else:
        print(f"{path}: {rep.indexed:,} completions indexed; the echo index holds {out['echo_index']:,}")
        for n, r, d in rep.invalid[:20]:
            print(f"  line {n}: {r}: {d}", file=sys.stderr)
    return 1 if rep.invalid else 0


def cmd_calibrate_detector(a: argparse.Namespace) -> int:
    """Exit 0 with the threshold; 2 when a file is missing or the detector job fails."""
    import tempfile
    from pathlib import Path

    from daemon.job_launchers import Job, JobFailed, run_to_end
    from daemon.jobs.specs import DetectorSpec, read_texts
    from daemon.settings import Settings
    from policies.collapse import calibrate

    files = {"human": Path(a.human), "generated": Path(a.generated)}
    for name, f in files.items():
        if not f.is_file():
            raise CliError(f"--{name} {f}: no such file")
    reference = a.reference or str(Settings().base_checkpoint_path())
    with tempfile.TemporaryDirectory(prefix="cptd-calibrate-") as tmp:
        docs = Path(tmp) / "docs.jsonl"
        rows = [{"key": f"{name}:{i}", "text": t} for name, f in files.items() for i, t in enumerate(read_texts(f))]
        docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = DetectorSpec(
            served=a.served, reference=reference, adapter=a.adapter, docs_path=str(docs), out=str(Path(tmp) / "scores.json"),
            max_len=a.max_len, device=a.device,
        )  # fmt: skip
        try:
            scores = run_to_end(Job(spec, Path(tmp) / "spec.json", Path(tmp) / "detector.log"))["rows"]
        except JobFailed as e:
            raise CliError(f"the detector job failed: {e}") from None
    by = {name: [s["score"] for s in scores if s["key"].startswith(name + ":") and s["score"] is not None] for name in files}
    cal = calibrate(by["human"], by["generated"], a.max_false_positive)
    if a.json:
        print(json.dumps(cal.__dict__))
    else:
        print(
            f"threshold {cal.threshold:.4f}: flags {cal.human_flagged:.1%} of {cal.human_docs} human documents and catches "
            f"{cal.generated_caught:.1%} of {cal.generated_docs} generated ones\n"
            f"policy: collapse: {{detector: true, detector_threshold: {cal.threshold:.4f}}}"
        )
    return 0


def _rater_train(a: argparse.Namespace) -> int:
    from daemon.rater_train import cmd_rater_train

    return cmd_rater_train(a)


def cmd_seed_replay(a: argparse.Namespace) -> int:
    """Exit 0: all lines seeded; 1: some lines invalid (named, the rest seeded); 2: nothing could be read."""
    import random

    from daemon.seed_replay import seed_replay

    path, policy, store = _file_policy_store(a)
    rep = seed_replay(path, store, policy, random.Random(a.seed))
    st = store.replay_stats()
    out = {
        "lines": rep.lines,
        "offered": rep.offered,
        "placed": rep.placed,
        "invalid": len(rep.invalid),
        "reservoir_docs": st["replay_docs"],
        "reservoir_cap": policy.replay.reservoir_docs,
        "seen": st["replay_seen"],
    }
    if a.json:
        print(json.dumps({**out, "invalid_lines": [{"line": n, "reason": r, "detail": d} for n, r, d in rep.invalid]}))
    else:
        print(
            f"{path}: {rep.offered:,} documents offered, {rep.placed:,} placed; reservoir now "
            f"{st['replay_docs']:,}/{policy.replay.reservoir_docs:,} (Algorithm R over {st['replay_seen']:,} seen)"
        )
        for n, r, d in rep.invalid[:20]:
            print(f"  line {n}: {r}: {d}", file=sys.stderr)
        if len(rep.invalid) > 20:
            print(f"  ... and {len(rep.invalid) - 20} more invalid lines", file=sys.stderr)
    return 1 if rep.invalid else 0


def cmd_accept_redis_reset(a: argparse.Namespace) -> int:
    """Exit 0: Redis agrees with the checkpoint volume (made to with --yes, or already); 1: it does not and --yes was
    not given (the changes are shown, nothing written); 2: the policy file is invalid."""
    from daemon.redis_loss import accept_reset

    s, _, store = _policy_store(a)
    plan = accept_reset(store, s.checkpoint_dir, apply=a.yes)
    if a.json:
        applied = bool(a.yes and plan.cause)
        print(
            json.dumps({"cause": plan.cause, "changes": plan.changes, "applied": applied, "identity": plan.identity.id, "todo": plan.todo})
        )
    elif plan.cause is None:
        print(f"Redis agrees with the checkpoint volume {s.checkpoint_dir}: nothing to accept")
    else:
        print(f"Redis lost data: {plan.cause}")
        print(("changed:" if a.yes else "would change (run again with --yes):") + "".join(f"\n  - {c}" for c in plan.changes))
        if plan.todo:
            print("then:" + "".join(f"\n  - {t}" for t in plan.todo))
    return 0 if plan.cause is None or a.yes else 1


def cmd_demo(a: argparse.Namespace) -> int:
    if a.preflight:
        from daemon.dev.preflight import run_preflight

        return run_preflight()
    from daemon.dev.demo import run_demo

    return run_demo(workdir=a.workdir, docs=a.docs, pretrain_steps=a.pretrain_steps, round_steps=a.round_steps)


def plan_spec(a: argparse.Namespace, out: str) -> Any:
    """The PlanSpec of `cptd plan`'s flags, or a refusal (ValueError) that names the bad input."""
    from pydantic import ValidationError

    from daemon.jobs.specs import PlanSpec
    from daemon.settings import Settings
    from policies.config import PolicyError, load_policy

    try:
        policy = load_policy(a.policy) if a.policy else None
    except PolicyError as e:
        raise ValueError(f"invalid policy: {e}") from None
    try:
        shape = json.loads(open(a.model, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {a.model}: not a readable config.json ({e})") from None
    missing = [k for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers") if not isinstance(shape, dict) or k not in shape]
    if missing:
        raise ValueError(f"--model {a.model}: a Hugging Face config.json needs {', '.join(missing)}")
    if a.gpus < 1 or a.nodes < 1:
        raise ValueError(f"--gpus {a.gpus} --nodes {a.nodes}: both must be at least 1")
    if a.nodes > a.gpus or a.gpus % a.nodes:
        raise ValueError(f"--gpus {a.gpus} over --nodes {a.nodes}: every node needs the same number of GPUs, at least one")
    gpu_memory_gb, host_memory_gb = a.gpu_memory_gb, a.host_memory_gb
    if gpu_memory_gb is None or host_memory_gb is None:  # the daemon's declaration, read and checked as PENDING reads it
        declared = Settings()
        gpu_memory_gb = declared.train_gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
        host_memory_gb = declared.train_host_memory_gb if host_memory_gb is None else host_memory_gb
    train = policy.train if policy else None
    if train is not None and train.mode == "qlora":
        raise ValueError("train.mode qlora: the 4-bit base cannot be built on fake tensors; plan the round as lora")
    try:
        return PlanSpec(
            model_shape=shape,
            **({"train": train} if train is not None else {}),
            schedule_kind=policy.schedule.kind if policy else "constant",
            gpus=a.gpus,
            nodes=a.nodes,
            gpu_memory_gb=gpu_memory_gb,
            host_memory_gb=host_memory_gb,
            volume_gb=a.volume_gb,
            steps=a.steps,
            out=out,
        )
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None


def cmd_plan(a: argparse.Namespace) -> int:
    """The memory plan of a round (docs/round-engine.md, Memory plan). The trainer's own step on fake tensors, in a
    child process: this process never imports torch. Exit 0 fits, 3 does not fit what was declared, 2 bad input."""
    import subprocess
    import tempfile
    from pathlib import Path

    from pydantic import ValidationError

    with tempfile.TemporaryDirectory(prefix="cptd-plan-") as d:
        try:
            spec = plan_spec(a, str(Path(d) / "plan.json"))
        except ValidationError:  # the daemon's settings from the environment: main() names each field, as for any command
            raise
        except ValueError as e:
            raise CliError(f"plan: {e}") from None
        spec_path = spec.write(Path(d) / "spec.json")
        done = subprocess.run([sys.executable, "-m", spec.module, str(spec_path)], capture_output=True, text=True)
        if done.returncode != 0 or not spec.result_file.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CliError(f"plan: the plan job failed (exit {done.returncode}): {last}", Exit.NO)
        result = json.loads(spec.result_file.read_text())
    print(json.dumps(result, indent=1, sort_keys=True) if a.json else done.stdout, end="" if not a.json else "\n")
    return 3 if result["refusals"] else 0


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of the policy file (deploy/policy.schema.json is this, committed for editors)."""
    from policies.config import Policy

    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **Policy.model_json_schema()}


def cmd_policy_schema(a: argparse.Namespace) -> int:
    print(json.dumps(policy_schema(), indent=2))
    return 0


def cmd_completion(a: argparse.Namespace) -> int:
    """The shell's completion script, generated from the parser itself by shtab (never out of date)."""
    import shtab

    print(shtab.complete(build_parser(), shell=a.shell))
    return 0


def cptd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cptd")
    except PackageNotFoundError:
        return "unknown (not installed: run from a source tree)"


def _epilog() -> str:
    rows = "\n".join(f"  {int(code):>2}  {why}" for code, why in EXIT.items())
    return (
        f"exit codes (every command; --wait: `trigger --wait`, `round ID --wait`):\n{rows}\n\n"
        'errors: one line on stderr; with --json, {"error": ...} on stdout'
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as a CliError (one line, JSON with --json) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.removeprefix("cptd").strip()  # "cptd round" -> "round"; say_error says "cptd: " already
        raise CliError(f"{sub + ': ' if sub else ''}{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="cptd", description="continual pre-training daemon", epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--version", action="version", version=f"cptd {cptd_version()}")
    ap.add_argument("--url", default=os.environ.get("CPTD_URL", "http://127.0.0.1:8080"), help="API of a running daemon")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    # The same two options after the subcommand (`cptd status --json`); SUPPRESS keeps a value given before it.
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="API of a running daemon")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    p = add("run", help="run the daemon (policy from --policy or $CPTD_POLICY)")
    p.add_argument("--policy", default=None)
    p.set_defaults(fn=cmd_run)
    p = add("demo", help="run everything on embedded services with a sample stream")
    p.add_argument("--workdir", default=None, help="where to keep the demo's files (default: a temp dir)")
    p.add_argument("--docs", type=int, default=1200, help="sample messages to stream")
    p.add_argument("--pretrain-steps", type=int, default=300, help="steps of general pre-training of the demo's base model")
    p.add_argument("--round-steps", type=int, default=80, help="optimizer steps of the demo's round")
    p.add_argument("--preflight", action="store_true", help="only check that this install can run the demo, then exit")
    p.set_defaults(fn=cmd_demo)
    p = add("status", help="ingest counts, buffer and state of a running daemon")
    p.set_defaults(fn=cmd_status)
    p = add("round", help="show one round's lineage; --wait: until it ends, the exit code saying how (see below)")
    p.add_argument("round")
    _wait_options(p)
    p.set_defaults(fn=cmd_round)
    p = add("rounds", help="list rounds, or show one round's lineage")
    p.add_argument("round", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(fn=cmd_rounds)
    p = add("trigger", help="start a round now (token from $CPTD_API_TOKEN[_FILE])")
    p.add_argument("--reason", default="cli")
    _wait_options(p)
    p.set_defaults(fn=cmd_trigger)
    p = add("cancel", help="cancel a running round (its documents go back to the buffer)")
    p.add_argument("round")
    p.set_defaults(fn=cmd_cancel)
    for name, what in (("approve", "deploy"), ("reject", "not deploy (it ends REJECTED)")):
        p = add(name, help=f"deploy.mode approve: {what} a round waiting in AWAITING_APPROVAL")
        p.add_argument("round")
        p.add_argument("--note", default=None, help="why (kept in the round's record)")
        p.add_argument("--by", default=None, help="who decides (default: user@host)")
        p.set_defaults(fn=cmd_decide)
    p = add("rollback", help="serve the previous version again, or the named round (or 'base')")
    p.add_argument("round", nargs="?")
    p.set_defaults(fn=cmd_rollback)
    p = add("seed-replay", help="seed the replay reservoir from a JSONL corpus (the original pre-training mix)")
    p.add_argument("file")
    p.add_argument("--policy", default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the reservoir's draws (default: random)")
    p.set_defaults(fn=cmd_seed_replay)
    p = add("index-echoes", help="index completions of the served model (JSONL) so that copies of them are caught as echoes")
    p.add_argument("file")
    p.add_argument("--policy", default=None)
    p.set_defaults(fn=cmd_index_echoes)
    p = add("calibrate-detector", help="choose collapse.detector_threshold from held-out human and generated samples (JSONL)")
    p.add_argument("--human", required=True, help="documents people wrote (JSONL with text)")
    p.add_argument("--generated", required=True, help="documents the served model generated (JSONL with text)")
    p.add_argument("--served", required=True, help="checkpoint directory of the served model")
    p.add_argument("--adapter", default=None, help="the served LoRA adapter, if clients use one")
    p.add_argument("--reference", default=None, help="the original base checkpoint (default $CPTD_BASE_CHECKPOINT)")
    p.add_argument("--max-false-positive", type=float, default=0.01, help="share of human documents that may be flagged")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-len", type=int, default=512)
    p.set_defaults(fn=cmd_calibrate_detector)
    p = add("rater-train", help="fit the head or classifier rater to pointwise ratings (JSONL); held-out agreement")
    p.add_argument("--annotations", required=True, help='JSONL: {"text", "ratings": {criterion: 1..scale}, "domain"}')
    p.add_argument("--served", default=None, help="checkpoint directory of the served model (default $CPTD_BASE_CHECKPOINT)")
    p.add_argument("--adapter", default=None, help="head: the served LoRA adapter, if clients use one")
    p.add_argument("--out", default=None, help="where the rater goes (default: <served>/rater)")
    p.add_argument("--backend", choices=["head", "classifier"], default="head")
    p.add_argument("--policy", default=None, help="take criteria, domains and scale from its curation.rater")
    p.add_argument("--scale", type=int, default=5, help="ratings run 1..scale (without --policy)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of valid lines held out for the agreement figures")
    p.add_argument("--min-annotations", type=int, default=20, help="refuse with fewer valid lines")
    p.add_argument("--epochs", type=int, default=0, help="0: the backend's default")
    p.add_argument("--lr", type=float, default=0.0, help="0: the backend's default")
    p.add_argument("--hidden", type=int, default=0, help="head: one hidden layer of N units (0: linear)")
    p.add_argument("--dtype", default=None, help="compute dtype of the served model (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(fn=_rater_train)
    p = add("plan", help="memory plan of a round: per-GPU peak, host memory, checkpoint bytes (the trainer's step on fake tensors)")
    p.add_argument("--policy", default=None, help="policy file whose train section is planned (default: the defaults)")
    p.add_argument("--model", required=True, help="the model's Hugging Face config.json (no weights needed)")
    p.add_argument("--gpus", type=int, required=True, help="ranks in all")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="per GPU, GiB (default: $CPTD_TRAIN_GPU_MEMORY_GB)")
    p.add_argument("--host-memory-gb", type=float, default=None, help="per node, GiB (default: $CPTD_TRAIN_HOST_MEMORY_GB)")
    p.add_argument("--volume-gb", type=float, default=None, help="the checkpoint volume, GiB")
    p.add_argument("--steps", type=int, default=None, help="a round's optimizer steps (default: max_steps, else one checkpoint interval)")
    p.set_defaults(fn=cmd_plan)
    p = add("accept-redis-reset", help="after Redis lost data and an operator checked: make Redis agree with the checkpoint volume")
    p.add_argument("--policy", default=None)
    p.add_argument("--yes", action="store_true", help="write the changes (without it: only show them)")
    p.set_defaults(fn=cmd_accept_redis_reset)
    p = add("calibrate-language", help="derive a language profile from a clean sample; prints YAML for quality.profiles")
    p.add_argument("--lang", required=True, help="ISO 639 code")
    p.add_argument("--sample", required=True, help="clean documents: JSONL with text, or plain text split by lines of ---")
    p.add_argument("--tail", type=float, default=0.01, help="share of the sample each threshold may cut")
    p.set_defaults(fn=cmd_calibrate_language)
    p = add("validate-policy", help="check a policy file; exit 1 and name the field if invalid")
    p.add_argument("file")
    p.set_defaults(fn=cmd_validate_policy)
    p = add("policy-schema", help="print the policy file's JSON Schema (deploy/policy.schema.json, for editors)")
    p.set_defaults(fn=cmd_policy_schema)
    p = add("completion", help="print a shell completion script: cptd completion bash > /etc/bash_completion.d/cptd")
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    p.set_defaults(fn=cmd_completion)
    return ap


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait until the round ends; the exit code says how (cptd --help)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S seconds (exit 14)")
    p.add_argument("--poll", type=float, default=2.0, metavar="S", help="with --wait: seconds between reads of the round")


def main(argv: list[str] | None = None) -> None:
    """Run one command; every error ends here as one line (JSON with --json) and an Exit code, never a traceback."""
    from pydantic import ValidationError

    args = sys.argv[1:] if argv is None else argv
    a: argparse.Namespace | None = None
    try:
        a = build_parser().parse_args(args)
        code = a.fn(a)
    except CliError as e:
        code = _fail(a, args, str(e), e.code)
    except ValidationError as e:  # settings from the environment, or an answer that is not a round record
        what = "; ".join(
            (f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ") for err in e.errors()
        )
        code = _fail(a, args, f"invalid {e.title}: {what}", Exit.BAD_INPUT)
    except BrokenPipeError:  # `cptd policy-schema | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        code = Exit.OK
    except KeyboardInterrupt:
        code = _fail(a, args, "interrupted", Exit.NO)
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: named in one line
        import logging

        if logging.getLogger().handlers:  # `cptd run` set up its JSON logs: the traceback goes there, as a field
            logging.getLogger("cptd.cli").error("command failed", exc_info=True)
        code = _fail(a, args, f"{type(e).__name__}: {e}", Exit.NO)
    sys.exit(int(code))


def _fail(a: argparse.Namespace | None, args: list[str], message: str, code: Exit) -> Exit:
    say_error(" ".join(message.split()), a.json if a is not None else "--json" in args)  # one line, whatever the message held
    return code


if __name__ == "__main__":
    main()
