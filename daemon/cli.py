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
    p = sub.add_parser("validate-policy", help="check a policy file; exit 1 and name the field if invalid")
    p.add_argument("file")
    p.set_defaults(fn=cmd_validate_policy)
    a = ap.parse_args(argv)
    sys.exit(a.fn(a))


if __name__ == "__main__":
    main()
