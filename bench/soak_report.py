"""What the soak measured and whether its invariants held: per-round samples, the end checks, soak-report.json and .png.

Every figure comes from the running system: the replicas' own answers (version served, paused), Redis (INFO, DBSIZE,
the round records), the daemon's /status counts, the dead-letter topic read back from the broker, the checkpoint
volume and /proc. An invariant that did not hold becomes a line in `findings` with its evidence.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.soak import DLQ_TOPIC, DOCS_TOPIC, Domain, Planned, Stack, safe_rounds, supervise
from connectors.vllm import Replica
from daemon.dev.services import wait_for
from daemon.round_record import TERMINAL


def _replica_state(url: str) -> tuple[str, bool | None]:
    r = Replica(url)
    try:
        return r.weight_version(), r.is_paused()
    except Exception as e:  # noqa: BLE001 - a replica down is recorded, not raised
        return f"unreachable ({type(e).__name__})", None
    finally:
        r.close()


def heldout_nll(s: Stack, doms: list[Domain]) -> dict[str, float | None]:
    """Mean nats per token of each domain's held-out documents under what the first reachable replica serves."""
    for v in s.vllms:
        r = Replica(v.url)
        try:
            out: dict[str, float | None] = {}
            for d in doms:
                scores = r.prompt_logprobs(d.heldout, max_tokens_per_doc=128)
                tokens = sum(x.tokens for x in scores)
                out[d.name] = round(-math.fsum(x.logprob_sum for x in scores) / tokens, 4) if tokens else None
            return out
        except Exception:  # noqa: BLE001 - try the next replica
            continue
        finally:
            r.close()
    return {d.name: None for d in doms}


def _disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass  # pruned while walking
    return total


def _desired(s: Stack) -> str | None:
    try:
        return (s.leader().status().get("rounds", {}).get("serving") or {}).get("desired_version")
    except Exception:  # noqa: BLE001 - the daemon may be restarting
        return None


def settle(s: Stack, timeout: float = 90.0) -> float | None:
    """Seconds until every replica serves the daemon's desired version, unpaused; None if not within `timeout`.

    A replica restarted in the batch's last phase is found by discovery and reconciled seconds after the round
    ended: the invariant is that replicas agree once the swap (or the reconcile) is done, so the sample waits
    for it, bounded, and the report shows how long it took."""
    t0 = time.monotonic()

    def agreed() -> bool:
        states = [_replica_state(v.url) for v in s.vllms]
        want = _desired(s)
        return want is not None and all(ver == want and paused is False for ver, paused in states)

    try:
        wait_for(agreed, timeout, "the replicas to agree with the daemon", 0.5)
    except TimeoutError:
        return None
    return round(time.monotonic() - t0, 1)


def sample(s: Stack, doms: list[Domain], i: int, domain: str) -> dict[str, Any]:
    """The state after batch `i`'s rounds ended (i = -1: before any round)."""
    versions, paused = {}, {}
    for v in s.vllms:
        versions[v.url], paused[v.url] = _replica_state(v.url)
    desired = _desired(s)
    mem = keys = None
    try:
        mem, keys = int(s.store.r.info("memory")["used_memory"]), int(s.store.r.dbsize())
    except Exception:  # noqa: BLE001 - Redis down
        pass
    return {
        "batch": i,
        "domain": domain,
        "at": time.time(),
        "versions": versions,
        "paused": paused,
        "desired_version": desired,
        "heldout_nll": heldout_nll(s, doms),
        "redis_used_memory": mem,
        "redis_keys": keys,
        "disk_bytes": _disk_bytes(s.ckpt),
        "daemon_rss": {str(d.port): d.rss_bytes() for d in s.daemons},
    }


def keep_manifests(s: Stack, manifests: dict[str, list[dict[str, Any]]]) -> None:
    """Read each ended round's manifest before retention may prune its directory (freshness needs it)."""
    for r in safe_rounds(s):
        key = f"{r['id']}@{r['created_at']}"
        snap = r.get("snapshot")
        if key in manifests or not snap or r["state"] not in TERMINAL:
            continue
        p = Path(snap["manifest"])
        manifests[key] = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def end_reason(r: dict[str, Any]) -> str:
    st = r["state"]
    if st == "DEPLOYED":
        return f"deployed {r.get('candidate') or (r.get('gate') or {}).get('chosen') or ''}".strip()
    if st == "REJECTED":
        return "; ".join(x["message"] for x in (r.get("gate") or {}).get("reasons", [])) or ""
    if st == "ROLLED_BACK":
        rb = r.get("rollback") or {}
        return f"rolled back ({rb.get('trigger')}): {rb.get('reason') or ''}".strip()
    return r.get("error") or ""


def dead_letters(bootstrap: str, timeout: float = 60.0) -> tuple[int, int]:
    """(messages on the dead-letter topic, distinct source offsets among them): a dead letter may be sent twice."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        tps = [TopicPartition(DLQ_TOPIC, p) for p in sorted(c.partitions_for_topic(DLQ_TOPIC) or [])]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        n, sources = 0, set()
        deadline = time.monotonic() + timeout
        while any(c.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=1000).values():
                for rec in recs:
                    h = dict(rec.headers)
                    n += 1
                    sources.add((h.get("cptd-source-topic"), h.get("cptd-source-partition"), h.get("cptd-source-offset")))
        return n, len(sources)
    finally:
        c.close()


def freshness(s: Stack, rounds: list[dict[str, Any]], manifests: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Seconds from a document's production to the end of the swap that first served a version trained on it."""
    out = []
    for r in rounds:
        dep = r.get("deploy") or {}
        if r["state"] not in ("DEPLOYED", "ROLLED_BACK") or not dep.get("ok") or dep.get("kind") != "deploy":
            continue
        for m in manifests.get(f"{r['id']}@{r['created_at']}", []):
            t = s.produced.get((m["partition"], m["offset"])) if m.get("topic") == DOCS_TOPIC and not m.get("heldout") else None
            if t is not None:
                out.append(dep["finished_at"] - t)
    return out


def _pct(xs: list[float], q: int) -> float | None:
    if not xs:
        return None
    return round(xs[0] if len(xs) == 1 else statistics.quantiles(xs, n=100, method="inclusive")[q - 1], 1)


def _growth(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return round(v[-1] / v[0] - 1, 3) if len(v) >= 2 and v[0] else None


def finish(
    s: Stack,
    doms: list[Domain],
    planned: list[Planned],
    samples: list[dict[str, Any]],
    manifests: dict[str, list[dict[str, Any]]],
    notes: list[str],
    took: float,
) -> dict[str, Any]:
    """The end checks: accounting, rounds, replicas, growth, freshness, forgetting; `findings` lists what broke."""
    findings = list(notes)

    def all_ended() -> bool:
        supervise(s)
        return not [r for r in safe_rounds(s) if r["state"] not in TERMINAL]

    try:
        wait_for(all_ended, 300, "every round to end", 0.5)
    except TimeoutError as e:
        findings.append(str(e))
    keep_manifests(s, manifests)
    findings += [
        f"daemon :{x['daemon']} exited on its own with code {x['code']} (restarted, as Kubernetes would); its last log line: "
        f"{x['last_log_line']}"
        for x in s.exits
    ]

    def counts_now() -> dict[str, Any] | None:
        return s.leader().status().get("counts")

    counts = dict(wait_for(counts_now, 120, "the daemon's /status with counts", 0.5) or {})
    by = dict(counts["by_outcome"])
    for before in s.flushed_counts:  # what Redis had counted when a redis_flush fault emptied it
        counts["total"] += before["total"]
        for k, n in before["by_outcome"].items():
            by[k] = by.get(k, 0) + n
    produced = len(s.produced)
    dl_msgs, dl_distinct = dead_letters(s.bootstrap)
    dl_expected = by.get("dead_lettered", 0) + by.get("rejected", 0)
    accounting = {
        "produced": produced,
        "accounted": counts["total"],
        "by_outcome": by,
        "dead_letter_messages": dl_msgs,
        "dead_letter_distinct": dl_distinct,
        "dead_letter_expected": dl_expected,
        "exact": counts["total"] == produced and dl_distinct == dl_expected,
        "counted_before_flushes": [c["total"] for c in s.flushed_counts],
    }
    if not accounting["exact"]:
        findings.append(
            f"accounting: {produced} produced, {counts['total']} accounted ({by}); dead letters {dl_distinct} distinct, "
            f"{dl_expected} expected (dead_lettered + rejected)"
        )
    live = {f"{r['id']}@{r['created_at']}" for r in safe_rounds(s)}
    recs = sorted(s.records.values(), key=lambda r: r["created_at"])
    rounds = [
        {
            "id": r["id"],
            "trigger": r["trigger"]["kind"],
            "trigger_reason": r["trigger"].get("reason", ""),
            "state": r["state"],
            "reason": end_reason(r),
            "gone_from_redis": f"{r['id']}@{r['created_at']}" not in live,
            "created_at": r["created_at"],
            "updated_at": r["updated_at"],
            "seconds": round(r["updated_at"] - r["created_at"], 1),
        }
        for r in recs
    ]
    last_flush = max(s.flushed_at, default=0.0)
    for r in rounds:  # a record Redis lost in a redis_flush fault: expected, reported as such
        r["forgotten_by_flush"] = r["gone_from_redis"] and r["created_at"] < last_flush
    bad = [r for r in rounds if (r["state"] not in TERMINAL or not r["reason"]) and not r["forgotten_by_flush"]]
    if bad:
        findings.append(f"rounds not terminal or without a reason: {[(r['id'], r['state'], r['reason']) for r in bad]}")
    gone = [r["id"] for r in rounds if r["gone_from_redis"] and not r["forgotten_by_flush"]]
    if gone:
        findings.append(f"round records gone from Redis (the report keeps their last state): {gone}")
    ids = [r["id"] for r in rounds]
    if len(ids) != len(set(ids)):
        findings.append(f"round ids repeat: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    final = {v.url: _replica_state(v.url) for v in s.vllms}
    after = [x for x in samples if x["batch"] >= 0]
    left_paused = sum(1 for x in after for p in x["paused"].values() if p) + sum(1 for _, p in final.values() if p)
    if left_paused:
        findings.append(f"replicas left paused: {left_paused} (samples {[x['paused'] for x in after]}, final {final})")
    disagree = [
        (x["batch"], x["versions"], x["desired_version"])
        for x in after
        if len(set(x["versions"].values())) != 1 or x["desired_version"] not in x["versions"].values()
    ]
    if disagree:
        findings.append(f"replicas disagree with each other or with the daemon after batches: {disagree}")
    fresh = freshness(s, recs, manifests)
    last = after[-10:]
    first_dom = doms[0].name
    first_trained = next((x for x in after if x["domain"] == first_dom), None)
    forgetting = None
    if first_trained and after and first_trained["heldout_nll"].get(first_dom) and after[-1]["heldout_nll"].get(first_dom):
        forgetting = round(after[-1]["heldout_nll"][first_dom] / first_trained["heldout_nll"][first_dom] - 1, 4)
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s.cfg).items()},
        "wall_s": round(took, 1),
        "faults": [vars(p) for p in planned],
        "daemon_exits": s.exits,
        "accounting": accounting,
        "rounds": {
            "started": len(rounds),
            "ended": sum(1 for r in rounds if r["state"] in TERMINAL),
            "by_state": {st: sum(1 for r in rounds if r["state"] == st) for st in sorted({r["state"] for r in rounds})},
            "list": rounds,
        },
        "replicas": {
            "left_paused": left_paused,
            "agree_after_every_round": not disagree,
            "final": {u: {"version": v, "paused": p} for u, (v, p) in final.items()},
        },
        "samples": samples,
        "growth_last_rounds": {k: _growth([x[k] for x in last]) for k in ("redis_used_memory", "redis_keys", "disk_bytes")}
        | {"daemon_rss": _growth([sum(v for v in x["daemon_rss"].values() if v) or None for x in last])},
        "freshness_s": {"docs": len(fresh), "p50": _pct(fresh, 50), "p95": _pct(fresh, 95)},
        "forgetting": {"domain": first_dom, "heldout_nll_change_since_first_trained": forgetting},
        "invariants": {
            "accounting_exact": accounting["exact"],
            "rounds_terminal_with_reason": not bad,
            "replicas_left_paused": left_paused,
            "replicas_agree": not disagree,
            "daemon_exits": len(s.exits),
        },
        "findings": findings,
    }


def write(report: dict[str, Any], root: Path, png: bool) -> None:
    path = root / "soak-report.json"
    report["png"] = plot(report, root / "soak-report.png") if png else "not asked for (--no-png)"
    path.write_text(json.dumps(report, indent=1, default=str))
    report["json"] = str(path)


def plot(report: dict[str, Any], out: Path) -> str:
    """Held-out loss per domain, resources per round, freshness; returns the path, or why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    xs = report["samples"]
    b = [x["batch"] for x in xs]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for dom in xs[0]["heldout_nll"]:
        ax[0].plot(b, [x["heldout_nll"].get(dom) for x in xs], marker="o", label=dom)
    ax[0].set(title="held-out loss per domain (nats/token)", xlabel="after batch (-1: base)")
    ax[0].legend()
    series = {
        "Redis memory": [x["redis_used_memory"] for x in xs],
        "Redis keys": [x["redis_keys"] for x in xs],
        "disk": [x["disk_bytes"] for x in xs],
        "daemon RSS": [sum(v for v in x["daemon_rss"].values() if v) or None for x in xs],
    }
    for name, vals in series.items():  # as a share of the series' peak: flat at the end is what bounded looks like
        peak = max((v for v in vals if v), default=None)
        ax[1].plot(b, [v / peak if v and peak else None for v in vals], marker=".", label=name)
    ax[1].set(title="resources, as a share of their peak", xlabel="after batch", ylim=(0, 1.05))
    ax[1].legend()
    fresh = report["freshness_s"]
    ax[2].bar(["p50", "p95"], [fresh["p50"] or 0, fresh["p95"] or 0])
    ax[2].set(title=f"freshness: produced -> served ({fresh['docs']} docs), s")
    fig.suptitle(
        f"soak: {report['rounds']['started']} rounds, {len(report['faults'])} faults; "
        + ("no findings" if not report["findings"] else f"{len(report['findings'])} findings")
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)


def summary(report: dict[str, Any]) -> str:
    a, r, rep = report["accounting"], report["rounds"], report["replicas"]
    lines = [
        f"soak: {report['wall_s']:.0f} s, {r['started']} rounds started, {r['ended']} ended {r['by_state']}",
        f"messages   {a['produced']} produced, {a['accounted']} accounted {a['by_outcome']}; dead letters "
        f"{a['dead_letter_distinct']} distinct ({a['dead_letter_messages']} sent), {a['dead_letter_expected']} expected",
    ]
    lines += [
        f"round      {x['id']} {x['trigger']:<7} {x['state']:<11} {x['seconds']:>6.1f} s  {x['reason'][:90]}"
        + (" (record gone from Redis)" if x["gone_from_redis"] else "")
        for x in r["list"]
    ]
    lines += [
        f"fault      {f['kind']:<14} batch {f['round']} planned {f['phase']:<10} fired in {f['fired_in']}: {f['note']}"
        for f in report["faults"]
    ]
    lines.append(f"replicas   left paused {rep['left_paused']}; agree after every round: {rep['agree_after_every_round']}")
    for x in report["samples"]:
        rss = sum(v for v in x["daemon_rss"].values() if v)
        lines.append(
            f"batch {x['batch']:>2}   {x['domain']:<12} versions {sorted(set(x['versions'].values()))} redis "
            f"{(x['redis_used_memory'] or 0) >> 10} KiB {x['redis_keys']} keys, disk {x['disk_bytes'] >> 20} MiB, "
            f"RSS {rss >> 20} MiB, held-out {x['heldout_nll']}"
        )
    f = report["freshness_s"]
    lines.append(f"freshness  p50 {f['p50']} s, p95 {f['p95']} s over {f['docs']} documents")
    lines.append(f"forgetting {report['forgetting']}")
    lines.append(f"growth     over the last rounds: {report['growth_last_rounds']}")
    lines.append(f"report     {report.get('json')}  figure: {report.get('png')}")
    lines += [f"FINDING    {x}" for x in report["findings"]] or ["findings   none: every invariant held"]
    return "\n".join(lines)
