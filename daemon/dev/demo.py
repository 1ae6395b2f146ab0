"""`cptd demo`: the whole product on one machine, offline, with nothing to configure.

It starts a Kafka-compatible broker (tansu), Redis and a vLLM CPU server,
builds a small Llama and pre-trains it briefly on general English (the Python
standard library's own prose), seeds the replay reservoir with that corpus,
runs `cptd run` against all of it as a child process (exactly what an operator
runs), and streams a new domain into Kafka: the documentation prose of the
installed ML libraries (torch, transformers), mixed with junk, copies and
broken messages. Then it triggers a round and follows it through SNAPSHOT,
TRAINING, EVALUATING and DEPLOYING, and ends with a report: what happened to
every message, drift, replay ratio, the LR schedule, loss curves, the gate's
decision, the swap pause, and one prompt completed by vLLM before and after.
Everything it started is stopped on exit or Ctrl-C.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from daemon.dev.services import Service, create_topics, free_port, kafka_service, redis_service, wait_for

PROMPT = "The model computes the gradient of the"
TOKEN = "demo-token"
TERMINAL = ("DEPLOYED", "REJECTED", "FAILED", "ROLLED_BACK")
DEMO_SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512)


def sample_stream(n: int, seed: int = 0) -> list[bytes]:
    """A day of a messy producer: mostly new-domain prose, some junk, copies and broken messages."""
    from daemon.dev.sample_corpus import domain_docs, mixed_corpus

    rng = random.Random(seed)
    good = domain_docs(int(n * 0.7), seed=seed)
    junk = [t for t in mixed_corpus(int(n * 0.12), seed=seed + 1)]
    msgs = [json.dumps({"text": t, "source": "docs", "id": f"doc-{i}"}).encode() for i, t in enumerate(good + junk)]
    msgs += [json.dumps({"text": t, "source": "mirror"}).encode() for t in rng.sample(good, int(n * 0.06))]  # exact copies
    for t in rng.sample(good, int(n * 0.06)):  # near copies: one word changed
        w = t.split(" ")
        w[rng.randrange(len(w))] = "changed"
        msgs.append(" ".join(w).encode())
    broken = [b"\xff\xfebad bytes", b'{"text": "cut off', b'{"title": "no text"}', b'{"text": 1}', b" "]
    msgs += [broken[i % len(broken)] for i in range(max(0, n - len(msgs)))]
    rng.shuffle(msgs)
    return msgs


def _bar(done: float, total: float, width: int = 32) -> str:
    filled = int(width * min(done, total) / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _spark(values: list[float], width: int = 48) -> str:
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    lo, hi = min(values), max(values)
    ticks = "▁▂▃▄▅▆▇█"
    return "".join(ticks[int((v - lo) / (hi - lo + 1e-12) * (len(ticks) - 1))] for v in values)


def _follow_child(cmd: list[str], progress: Path, log: Path, label: str, total: int) -> None:
    """Run a trainer child and draw its steps as a bar (the trainer writes progress.jsonl)."""
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    step, loss, drawn = 0, float("nan"), ""
    while p.poll() is None:
        time.sleep(0.3)
        if progress.exists():
            for line in progress.read_text().splitlines():
                ev = json.loads(line)
                if ev["event"] == "step":
                    step, loss = ev["step"], ev["loss"]
        line = f"\r  {label} {_bar(step, total)} step {step}/{total}  loss {loss:.3f}"
        if line != drawn:
            print(line, end="", flush=True)
            drawn = line
    print()
    if p.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {p.returncode}); see {log}")


def build_base_model(root: Path, steps: int) -> Path:
    """A small Llama with its own tokenizer, pre-trained briefly on general prose by the same trainer rounds use."""
    from daemon.dev.sample_corpus import domain_docs, english_docs
    from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama
    from daemon.jobs.specs import TrainSpec

    general = english_docs(400, 2048, seed=1)
    init = build_tiny_llama(root / "init", general + domain_docs(150, seed=99), TinyLlamaShape(**DEMO_SHAPE), seed=0)
    data = root / "general.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in general))
    spec = TrainSpec(parent_dir=str(init), out_dir=str(root / "pretrain"), new_path=str(data),
                     schedule={"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.05},
                     train={"seq_len": 128, "micro_batch_size": 8, "grad_accum": 1, "max_steps": steps, "eval_interval": 10**6,
                            "checkpoint_interval": 10**6, "device": "cpu"}, round_id="pretrain", cpu_threads=1)
    spec_path = root / "pretrain-spec.json"
    spec_path.write_text(spec.to_json())
    _follow_child([sys.executable, "-m", "daemon.jobs.trainer", str(spec_path)], root / "pretrain" / "progress.jsonl",
                  root / "pretrain.log", "pre-train", steps)
    base = root / "checkpoints" / "base"
    shutil.copytree(root / "pretrain" / "final", base)
    return base


def demo_policy(path: Path, round_steps: int) -> None:
    path.write_text(yaml.safe_dump({
        "name": "demo",
        "ingest": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "batch_max_docs": 200, "batch_max_wait_ms": 200},
        "train": {"seq_len": 128, "micro_batch_size": 8, "grad_accum": 1, "max_steps": round_steps, "eval_interval": 20,
                  "checkpoint_interval": 20, "keep_checkpoints": 3, "device": "cpu"},
        "schedule": {"kind": "rewarm_cosine", "warmup_frac": 0.05},
        "drift": {"peak_lr_min": 5e-4, "peak_lr_max": 1.5e-3, "warmup_frac_min": 0.05, "warmup_frac_max": 0.1,
                  "probe_docs": 64, "probe_max_len": 128},
        "replay": {"mode": "drift", "reservoir_docs": 2000},
        "rounds": {"heldout_frac": 0.1, "heldout_max_docs": 48, "replay_heldout_docs": 48, "eval_checkpoints": 2, "watch_s": 3},
        "gates": {"max_forgetting_nats": 0.5, "min_adaptation_nats": 0.0},
        "triggers": {"min_gap_s": 0},
    }, sort_keys=False))


def _complete(url: str, prompt: str) -> str:
    r = httpx.post(url + "/v1/completions", json={"model": "cptd", "prompt": prompt, "max_tokens": 24, "temperature": 0}, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def run_demo(workdir: str | None = None, docs: int = 1200, pretrain_steps: int = 300, round_steps: int = 80) -> int:
    from daemon.dev.vllm_server import VLLMServer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our bars only
    root = Path(workdir or tempfile.mkdtemp(prefix="cptd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    vllm: VLLMServer | None = None
    daemon: subprocess.Popen | None = None
    t_start = time.monotonic()
    try:
        print(f"cptd demo — working in {root}\n")
        redis = redis_service(root / "redis").start()
        services.append(redis)
        kafka = kafka_service(root / "kafka").start()
        services.append(kafka)
        bootstrap = f"127.0.0.1:{kafka.port}"
        create_topics(bootstrap, {"cptd.documents": 2, "cptd.dead-letter": 1})
        print(f"1. services     redis 127.0.0.1:{redis.port} (AOF on), Kafka-compatible broker (tansu) {bootstrap}")

        print("2. base model   a 4-layer Llama pre-trained on general English (the Python standard library's prose)")
        base = build_base_model(root, pretrain_steps)
        vllm = VLLMServer(model=str(base), served_model_name="cptd", log_path=root / "vllm.log").launch()
        vllm_proc_start = time.monotonic()
        print(f"3. serving      vLLM (CPU build) starting at {vllm.url} with the base model (logs: {root / 'vllm.log'})")

        policy = root / "policy.yaml"
        demo_policy(policy, round_steps)
        from connectors.redis_store import RedisStore
        from daemon.dev.sample_corpus import english_docs
        from daemon.seed_replay import seed_replay
        from policies.config import load_policy

        seed_file = root / "seed-replay.jsonl"
        seed_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_docs(300, 2048, seed=7)))
        rep = seed_replay(seed_file, RedisStore.from_url(f"redis://127.0.0.1:{redis.port}/0", "demo"), load_policy(policy), random.Random(0))
        print(f"4. replay       reservoir seeded with {rep.placed} general-English documents (what `cptd seed-replay` does)")

        port = free_port()
        env = dict(os.environ, CPTD_POLICY=str(policy), CPTD_REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
                   CPTD_KAFKA_BOOTSTRAP=bootstrap, CPTD_HTTP_HOST="127.0.0.1", CPTD_HTTP_PORT=str(port), CPTD_API_TOKEN=TOKEN,
                   CPTD_VLLM_URLS=vllm.url, CPTD_CHECKPOINT_DIR=str(root / "checkpoints"), CPTD_BASE_CHECKPOINT=str(base),
                   CPTD_TRAIN_CPU_THREADS="1")
        log = open(root / "cptd.log", "ab")
        api = f"http://127.0.0.1:{port}"
        status = lambda: httpx.get(api + "/status", timeout=5).json()  # noqa: E731

        msgs = sample_stream(docs)
        from kafka import KafkaProducer

        prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        for m in msgs:
            prod.send("cptd.documents", m)
        prod.flush()
        prod.close()
        print(f"5. stream       {len(msgs)} messages on topic cptd.documents: ML-library documentation (the new domain), "
              "junk, copies, broken messages")

        vllm.wait_healthy(600)
        print(f"   vLLM up after {time.monotonic() - vllm_proc_start:.0f} s")
        before = _complete(vllm.url, PROMPT)

        daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        print(f"6. cptd         {api}  (logs: {root / 'cptd.log'}; try `CPTD_URL={api} cptd status`)")
        wait_for(lambda: status()["ingest"]["assigned"], 120, "the daemon to join the consumer group", 0.3, daemon)

        def ingest_bar() -> bool:
            done = status().get("counts", {}).get("total", 0)
            print(f"\r   ingest    {_bar(done, len(msgs))} {done}/{len(msgs)} messages", end="", flush=True)
            return done >= len(msgs)

        wait_for(ingest_bar, 300, "the daemon to account for every message", 0.3, daemon)
        print()
        st = status()
        wait_for(lambda: status()["rounds"]["leader"], 60, "the daemon to take the round lease", 0.3, daemon)

        r = httpx.post(api + "/rounds", headers={"Authorization": f"Bearer {TOKEN}"}, json={"reason": "demo"}, timeout=30).json()
        rid = r.get("round")
        if not rid:
            raise RuntimeError(f"round not started: {r}")
        print(f"7. round {rid}  triggered (what `cptd trigger` does); following it:")
        rec = _follow_round(api, rid, daemon)
        after = _complete(vllm.url, PROMPT)
        _report(st, len(msgs), rec, before, after, time.monotonic() - t_start)
        return 0 if rec["state"] == "DEPLOYED" else 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        if daemon is not None and daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
        if vllm is not None and vllm.proc is not None:
            vllm.stop()
        for s in reversed(services):
            s.stop()
        print("stopped the daemon, vLLM, Kafka and Redis")


def _follow_round(api: str, rid: str, daemon: subprocess.Popen) -> dict:
    shown, drawn = "", ""
    while True:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {daemon.returncode}")
        rec = httpx.get(f"{api}/rounds/{rid}", timeout=10).json()
        state = rec["state"]
        if state != shown and shown:
            print()
        if state != shown:
            shown = state
        p = (rec.get("train") or {}).get("progress") or {}
        line = f"   {state:<11}"
        if state == "TRAINING" and p.get("total_steps"):
            line += f" {_bar(p.get('step', 0), p['total_steps'])} step {p.get('step', 0)}/{p['total_steps']}  loss {p.get('loss', float('nan')):.3f}"
        elif state == "EVALUATING":
            ep = rec.get("eval_progress") or {}
            line += (f" {_bar(ep['scored'], ep['total'])} {ep['scored']}/{ep['total']} models scored (serving + checkpoints)"
                     if ep.get("total") else " scoring the serving model and the round's checkpoints on held-out data")
        elif state == "SNAPSHOT":
            line += " moving the buffer into the round, holding out a slice, measuring drift, drawing replay"
        elif state == "DEPLOYING":
            line += " swapping weights into vLLM (pause, reload, verify, resume), then watching"
        if line != drawn:
            print("\r" + line.ljust(100), end="", flush=True)
            drawn = line
        if state in TERMINAL:
            print()
            return rec
        time.sleep(0.5)


def _report(st: dict, n_msgs: int, rec: dict, before: str, after: str, took: float) -> None:
    print("\n" + "=" * 78 + f"\nREPORT  round {rec['id']}: {rec['state']}" + (f"  ({rec['error']})" if rec.get("error") else ""))
    print("=" * 78)
    c = st["counts"]
    print(f"messages       {n_msgs} produced, {c['total']} accounted for: " +
          ", ".join(f"{k} {v}" for k, v in sorted(c["by_outcome"].items())))
    snap = rec.get("snapshot") or {}
    if snap:
        print(f"round data     {snap['docs']} documents (~{snap['tokens_estimate']:,} tokens): {snap['train_docs']} trained, "
              f"{snap['heldout_docs']} held out; manifest sha256 {snap['manifest_sha256'][:16]}")
    d = rec.get("drift") or {}
    s = d.get("stats") or {}
    if d:
        print(f"drift          score {d['score'] if d.get('score') is None else round(d['score'], 3)} ({d['level']}): "
              f"perplexity gap {s.get('ppl_gap', float('nan')):+.3f}, unigram JS distance {s.get('js_distance', float('nan')):.3f}")
        print(f"replay ratio   {rec.get('replay_ratio', 0):.2f} of the round's tokens from the reservoir (policy: follow drift)")
    sc = rec.get("schedule") or {}
    tr = rec.get("train") or {}
    curve = tr.get("curve") or []
    if sc and curve:
        lrs = [x[2] for x in curve]
        print(f"LR schedule    {sc['kind']}: re-warm to {sc['peak_lr']:.2e} (drift-chosen) over {sc['warmup_frac']:.0%} of the round, "
              f"cosine to {min(lrs):.2e}   {_spark(lrs)}")
        losses = [x[1] for x in curve]
        print(f"train loss     {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps            {_spark(losses)}")
    for e in tr.get("evals") or []:
        print(f"  held-out @ step {e['step']:>3}: new {e.get('loss_heldout_new', float('nan')):.3f}   replay {e.get('loss_heldout_replay', float('nan')):.3f}")
    ev = rec.get("eval") or {}
    if ev:
        print(f"eval           serving model: new {ev['serving']['new_nll']:.3f}, replay {ev['serving']['replay_nll']:.3f} nats/token")
        for cnd in ev["candidates"]:
            print(f"               {cnd['name']:<14} new {cnd['new_nll']:.3f}, replay {cnd['replay_nll']:.3f}")
    g = rec.get("gate") or {}
    if g:
        print(f"gate           {'ACCEPTED' if g['accepted'] else 'REJECTED'}: {g['reasons'][0] if g['reasons'] else ''}")
    dp = rec.get("deploy") or {}
    if dp:
        print(f"swap           {'ok' if dp['ok'] else 'failed'}; requests held for {dp['pause_seconds_max'] * 1000:.0f} ms "
              f"(no restart, no dropped request)")
    print(f"prompt         {PROMPT!r}")
    print(f"  before       {before!r}")
    print(f"  after        {after!r}")
    print(f"total time     {took:.0f} s")
