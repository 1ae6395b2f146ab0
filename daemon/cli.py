"""`cptd` — the operator's command line.

Commands that inspect or steer a running daemon talk to its HTTP API
(--url, default $CPTD_URL or http://127.0.0.1:8080); the rest run locally.
Tables for people by default, --json for scripts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _print_status(st: dict[str, Any]) -> None:
    ing = st.get("ingest", {})
    print(f"deployment  {st.get('name')}   policy {st.get('policy_hash')}   up {st.get('uptime_s')} s")
    print(f"ingest      {'paused (' + ing['paused'] + ')' if ing.get('paused') else 'running'}   "
          f"partitions {', '.join(ing.get('assigned') or []) or '-'}   batches {ing.get('batches')}")
    if "redis_error" in st:
        print(f"redis       UNREACHABLE: {st['redis_error']}")
        return
    b = st.get("buffer", {})
    print(f"buffer      {b.get('buffer_docs', 0):,} docs   {b.get('buffer_bytes', 0) / 1e6:,.1f} MB   "
          f"dedup keys exact {b.get('exact_keys', 0):,} / lsh {b.get('lsh_keys', 0):,}")
    rp = st.get("replay", {})
    print(f"replay      {rp.get('replay_docs', 0):,} / {rp.get('cap', 0):,} docs (reservoir over {rp.get('replay_seen', 0):,} seen)")
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
        print(f"invalid policy: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps({"valid": True, "hash": policy_hash(p), "policy": p.model_dump(mode="json")}, indent=2))
    else:
        print(f"{a.file}: valid (hash {policy_hash(p)}, deployment {p.name!r})")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    import httpx

    try:
        r = httpx.get(a.url.rstrip("/") + "/status", timeout=10)
    except httpx.HTTPError as e:
        print(f"cannot reach cptd at {a.url}: {e}", file=sys.stderr)
        return 2
    if r.status_code != 200:
        print(f"cptd at {a.url} answered {r.status_code}: {r.text}", file=sys.stderr)
        return 2
    st = r.json()
    print(json.dumps(st, indent=2)) if a.json else _print_status(st)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from daemon import logs
    from daemon.app import run
    from daemon.settings import Settings

    s = Settings() if a.policy is None else Settings(policy=a.policy)
    logs.setup(s.log_level)
    return run(s)


def cmd_seed_replay(a: argparse.Namespace) -> int:
    """Exit 0: all lines seeded; 1: some lines invalid (named, the rest seeded); 2: nothing could be read."""
    import random
    from pathlib import Path

    from connectors.redis_store import RedisStore
    from daemon.seed_replay import seed_replay
    from daemon.settings import Settings
    from policies.config import PolicyError, load_policy

    s = Settings() if a.policy is None else Settings(policy=a.policy)
    try:
        policy = load_policy(s.policy)
    except PolicyError as e:
        print(f"invalid policy: {e}", file=sys.stderr)
        return 2
    path = Path(a.file)
    if not path.is_file():
        print(f"{path}: no such file", file=sys.stderr)
        return 2
    store = RedisStore.from_url(s.redis_url.get_secret_value(), policy.name)
    rep = seed_replay(path, store, policy, random.Random(a.seed))
    st = store.replay_stats()
    out = {"lines": rep.lines, "offered": rep.offered, "placed": rep.placed, "invalid": len(rep.invalid),
           "reservoir_docs": st["replay_docs"], "reservoir_cap": policy.replay.reservoir_docs, "seen": st["replay_seen"]}
    if a.json:
        print(json.dumps({**out, "invalid_lines": [{"line": n, "reason": r, "detail": d} for n, r, d in rep.invalid]}))
    else:
        print(f"{path}: {rep.offered:,} documents offered, {rep.placed:,} placed; reservoir now "
              f"{st['replay_docs']:,}/{policy.replay.reservoir_docs:,} (Algorithm R over {st['replay_seen']:,} seen)")
        for n, r, d in rep.invalid[:20]:
            print(f"  line {n}: {r}: {d}", file=sys.stderr)
        if len(rep.invalid) > 20:
            print(f"  ... and {len(rep.invalid) - 20} more invalid lines", file=sys.stderr)
    return 1 if rep.invalid else 0


def cmd_demo(a: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    return run_demo(workdir=a.workdir, docs=a.docs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cptd", description="continual pre-training daemon")
    ap.add_argument("--url", default=os.environ.get("CPTD_URL", "http://127.0.0.1:8080"), help="API of a running daemon")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the daemon (policy from --policy or $CPTD_POLICY)")
    p.add_argument("--policy", default=None)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="run everything on embedded services with a sample stream")
    p.add_argument("--workdir", default=None, help="where to keep the demo's files (default: a temp dir)")
    p.add_argument("--docs", type=int, default=3000, help="sample messages to stream")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("status", help="ingest counts, buffer and state of a running daemon")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("seed-replay", help="seed the replay reservoir from a JSONL corpus (the original pre-training mix)")
    p.add_argument("file")
    p.add_argument("--policy", default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the reservoir's draws (default: random)")
    p.set_defaults(fn=cmd_seed_replay)
    p = sub.add_parser("validate-policy", help="check a policy file; exit 1 and name the field if invalid")
    p.add_argument("file")
    p.set_defaults(fn=cmd_validate_policy)
    a = ap.parse_args(argv)
    sys.exit(a.fn(a))


if __name__ == "__main__":
    main()
