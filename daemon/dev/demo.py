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
decision, the swap pause and how many of the completions it kept sending to
vLLM meanwhile failed, and one prompt completed by vLLM before and after.
Everything it started is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

import httpx
import yaml

from daemon.dev.process_control import DaemonProcess, daemon_env
from daemon.dev.services import Service, create_topics, free_port, kafka_service, redis_service, wait_for
from daemon.job_launchers import Job, JsonlFollower, ProcessLauncher
from daemon.jobs.specs import TrainSpec
from daemon.round_record import TERMINAL

PROMPT = "The model computes the gradient of the"
COMPLETIONS_TOPIC = "cptd.completions"  # what the serving side logs: the served model's own outputs (collapse.echo_topics)
TOKEN = "demo-token"
DEMO_SHAPE = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)


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


class Progress:
    """The demo's one progress display: a rich bar on a terminal; in a pipe or a file, plain lines.

    Plain lines (no carriage return, so a log reads top to bottom): the first state, then one line
    per tenth of the work (text changes when the total is unknown), at most one every `every_s`
    seconds and at least one every `heartbeat_s` while the work goes on, and the final count.
    """

    def __init__(
        self, label: str, out: TextIO | None = None, interactive: bool | None = None, every_s: float = 2.0, heartbeat_s: float = 30.0
    ):
        self.label, self.out = label, out or sys.stdout
        self.interactive = self.out.isatty() if interactive is None else interactive
        self.every_s, self.heartbeat_s = every_s, heartbeat_s
        self.t0 = time.monotonic()
        self.state: tuple[float, float | None, str] = (0, None, "")
        self.shown: tuple[float, float | None, str] | None = None
        self.shown_at = 0.0
        self._rich = None
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn(f"   {label:<11}"),
                BarColumn(bar_width=32),
                TextColumn("{task.fields[text]}"),
                TimeElapsedColumn(),
                console=Console(file=self.out),
                transient=False,
            )
            self._task = self._rich.add_task(label, total=None, text="")
            self._rich.start()

    def update(self, done: float, total: float | None = None, text: str = "") -> None:
        self.state = (done, total, text)
        if self._rich is not None:
            self._rich.update(self._task, completed=done, total=total, text=text)
            return
        now = time.monotonic()
        if self.shown is not None:
            since = now - self.shown_at
            moved = (
                int(10 * done / total) > int(10 * self.shown[0] / total) if total and self.shown[1] == total else self.state != self.shown
            )
            if since < self.every_s or not (moved or since >= self.heartbeat_s):
                return
        self._line(now)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.shown is None or self.state[:2] != self.shown[:2]:  # the final count, unless already shown
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        done, total, text = self.state
        pct = f"{min(done / total, 1):4.0%}  " if total else ""
        print(f"   {self.label:<11} {pct}{text}  ({now - self.t0:.0f} s)", file=self.out, flush=True)
        self.shown, self.shown_at = self.state, now

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RequestLoop:
    """Completions sent to vLLM around a swap, as users of the model would send them.

    `workers` clients, each with one request in flight and `gap_s` between requests: with no gap,
    some request is in flight at every moment of the swap however short it is (a swap of the demo's
    model takes a fraction of a second). Loopback only, and bounded in time (`max_s`), not in count:
    a count ran out before the swap on a loaded machine, where the evaluator's exit and the gate
    took longer than the requests lasted (CI, stop 29: 3000 sent in 27 s, none during the swap).
    """

    def __init__(self, url: str, workers: int = 2, gap_s: float = 0.0, max_s: float = 600.0):
        if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the demo's request loop only targets a loopback server, not {url}")
        self.url, self.workers, self.gap_s, self.max_s = url, workers, gap_s, max_s
        self.results: list[tuple[float, float, str | None]] = []  # (sent, answered or failed, error) as time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._deadline = 0.0
        self.started_at: float | None = None  # time.time()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads:
            return
        self._deadline = time.monotonic() + self.max_s
        self.started_at = time.time()
        self._threads = [threading.Thread(target=self._run, name=f"demo-requests-{i}", daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=65)

    def _claim(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _run(self) -> None:
        body = {"model": "cptd", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while self._claim():
                sent, err = time.time(), None
                try:
                    r = client.post("/v1/completions", json=body)
                    if r.status_code != 200 or not r.json().get("choices"):
                        err = f"HTTP {r.status_code}: {r.text[:200]}"
                except (httpx.HTTPError, ValueError) as e:
                    err = f"{type(e).__name__}: {e}"
                with self._lock:
                    self.results.append((sent, time.time(), err))
                self._stop.wait(self.gap_s)

    def elapsed(self) -> float:
        """Seconds from the start to the last answer."""
        with self._lock:
            return max((r[1] for r in self.results), default=self.started_at or 0.0) - (self.started_at or 0.0)

    def count(self, t0: float | None = None, t1: float | None = None) -> tuple[int, int, str | None]:
        """Requests in flight at some moment of [t0, t1] (all of them without a window): (requests, failed, first error)."""
        with self._lock:
            rs = [r for r in self.results if t0 is None or t1 is None or (r[0] <= t1 and r[1] >= t0)]
        errors = [r[2] for r in rs if r[2] is not None]
        return len(rs), len(errors), errors[0] if errors else None

    def failures(self, since: float, limit: int = 20) -> list[str]:
        """The first failed requests, each with when it was sent and answered in seconds from `since` (the swap's start).

        `limit` covers the 1 in 1000 tests/test_demo.py tolerates away from the swap in a 144 s loop, so a test can see
        every failure's time, not only the first few."""
        with self._lock:
            bad = [r for r in self.results if r[2] is not None][:limit]
        return [f"sent {s - since:+.2f} s, failed {e - since:+.2f} s: {err}" for s, e, err in bad]


def _spark(values: list[float], width: int = 48) -> str:
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    lo, hi = min(values), max(values)
    ticks = "▁▂▃▄▅▆▇█"
    return "".join(ticks[int((v - lo) / (hi - lo + 1e-12) * (len(ticks) - 1))] for v in values)


def _pretrain(spec: TrainSpec, root: Path, total: int) -> None:
    """The pre-training job, launched as a round's jobs are (daemon/job_launchers.py), its steps shown from progress.jsonl."""
    job = Job(spec, root / "pretrain-spec.json", root / "pretrain.log")
    launcher = ProcessLauncher(cpu_threads=1)
    launcher.start(job)
    follow = JsonlFollower(spec.progress_file)
    step, loss = 0, None
    with Progress("pre-train") as bar:
        while True:
            end = launcher.poll()
            for ev in follow.new():
                if ev["event"] == "step":
                    step, loss = ev["step"], ev["loss"]
            bar.update(step, total, f"step {step}/{total}  loss {_num(loss, '.3f')}")
            if end is not None:
                break
            time.sleep(0.3)  # a refresh interval for the bar; the loop ends when the job does
    if not end.ok:
        raise RuntimeError(f"pre-train failed: {end.cause}")


def build_base_model(root: Path, steps: int) -> Path:
    """A small Llama with its own tokenizer, pre-trained briefly (fp32) on general prose by the same trainer rounds use, stored in bf16."""
    from daemon.dev.sample_corpus import domain_docs, english_docs
    from daemon.dev.tiny_model import TinyLlamaShape, build_tiny_llama, cast_checkpoint

    general = english_docs(400, 2048, seed=1)
    init = build_tiny_llama(root / "init", general + domain_docs(150, seed=99), TinyLlamaShape(**DEMO_SHAPE), seed=0)
    data = root / "general.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in general))
    spec = TrainSpec(
        parent_dir=str(init),
        out_dir=str(root / "pretrain"),
        new_path=str(data),
        schedule={"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.05},
        train={
            "seq_len": 128,
            "micro_batch_size": 8,
            "grad_accum": 1,
            "max_steps": steps,
            "eval_interval": 10**6,
            "checkpoint_interval": 10**6,
            "device": "cpu",
        },
        round_id="pretrain",
        cpu_threads=1,
    )
    _pretrain(spec, root, steps)
    # Served in bf16, as the models cptd's users serve are; a round writes its candidates in bf16 too (the parent's dtype).
    return cast_checkpoint(root / "pretrain" / "final", root / "checkpoints" / "base", "bfloat16")


def demo_policy(path: Path, round_steps: int) -> None:
    """The demo's policy, sized so a round step costs about what a pre-training step does (docs/round-engine.md, Training on a CPU).

    - train.precision fp32: `auto` would pick bf16-mixed for the bf16 base, and bf16 autocast on a CPU costs 1.3-1.5x
      a fp32 step here (AVX-512 BF16) and 11x where oneDNN has no bf16 instructions (AVX2). The candidates are still
      written in bf16, the parent's dtype.
    - train.eval_max_docs 16: the stability-gap curve, five times a round, scores 16 held-out documents per slice
      (3.7 s) instead of 48 + 48 (10-14 s, as long as 20 training steps). The gate's evaluation scores them all.
    - rounds.budget_tokens: what `round_steps` steps train, so the round takes what it trains on, and the served model
      scores a pool of curation.pool_factor (3) times that, not the whole buffer, each document to the trainer's
      seq_len (curation.max_doc_tokens).
    """
    seq_len, micro_batch = 128, 8
    path.write_text(
        yaml.safe_dump(
            {
                "name": "demo",
                "ingest": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "batch_max_docs": 200, "batch_max_wait_ms": 200},
                "train": {
                    "seq_len": seq_len,
                    "micro_batch_size": micro_batch,
                    "grad_accum": 1,
                    "max_steps": round_steps,
                    "precision": "fp32",
                    "eval_interval": 20,
                    "eval_max_docs": 16,
                    "checkpoint_interval": 20,
                    "keep_checkpoints": 3,
                    "device": "cpu",
                },
                "schedule": {"kind": "rewarm_cosine", "warmup_frac": 0.05},
                "drift": {
                    "peak_lr_min": 5e-4,
                    "peak_lr_max": 1.5e-3,
                    "warmup_frac_min": 0.05,
                    "warmup_frac_max": 0.1,
                    "probe_docs": 64,
                    "probe_max_len": 128,
                },
                "replay": {"mode": "drift", "reservoir_docs": 2000},
                "rounds": {
                    "budget_tokens": round_steps * micro_batch * seq_len,
                    "heldout_frac": 0.15,
                    "heldout_max_docs": 48,
                    "replay_heldout_docs": 24,
                    "eval_checkpoints": 2,
                    "watch_s": 3,
                },
                "gates": {"max_forgetting_nats": 0.5, "min_adaptation_nats": 0.0},
                "triggers": {"min_gap_s": 0},
                "curation": {"score": "perplexity", "max_doc_tokens": seq_len},
                "collapse": {"echo_topics": [COMPLETIONS_TOPIC], "echo_action": "mark_synthetic", "synthetic_cap": 0.1},
            },
            sort_keys=False,
        )
    )


def _complete(url: str, prompt: str) -> str:
    r = httpx.post(url + "/v1/completions", json={"model": "cptd", "prompt": prompt, "max_tokens": 24, "temperature": 0}, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def run_demo(workdir: str | None = None, docs: int = 1200, pretrain_steps: int = 300, round_steps: int = 80) -> int:
    from transformers.utils import logging as hf_logging

    from daemon.dev.vllm_server import VLLMServer

    hf_logging.disable_progress_bar()  # our progress display only
    root = Path(workdir or tempfile.mkdtemp(prefix="cptd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    vllm: VLLMServer | None = None
    daemon: subprocess.Popen | None = None
    stopped: list[str] = []
    t_start = time.monotonic()
    on_term = None
    if threading.current_thread() is threading.main_thread():  # `kill` stops everything, as Ctrl-C does
        on_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        print(f"cptd demo — working in {root}\n")
        redis = redis_service(root / "redis").start()
        services.append(redis)
        kafka = kafka_service(root / "kafka").start()
        services.append(kafka)
        bootstrap = f"127.0.0.1:{kafka.port}"
        create_topics(bootstrap, {"cptd.documents": 2, "cptd.dead-letter": 1, COMPLETIONS_TOPIC: 1})
        import redis as redis_lib

        rc = redis_lib.Redis(host="127.0.0.1", port=redis.port)
        redis_version, aof = rc.info("server")["redis_version"], rc.config_get("appendonly")["appendonly"]
        rc.close()
        print(
            f"1. services     Redis {redis_version} 127.0.0.1:{redis.port} (appendonly {aof}), Kafka-compatible broker (tansu) {bootstrap}"
        )

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
        store = RedisStore.from_url(f"redis://127.0.0.1:{redis.port}/0", "demo")
        rep = seed_replay(seed_file, store, load_policy(policy), random.Random(0))
        print(f"4. replay       reservoir seeded with {rep.placed} general-English documents (what `cptd seed-replay` does)")

        port = free_port()
        env = daemon_env(
            policy=policy,
            redis_url=f"redis://127.0.0.1:{redis.port}/0",
            bootstrap=bootstrap,
            port=port,
            token=TOKEN,
            vllm_urls=[vllm.url],
            checkpoint_dir=root / "checkpoints",
            base_checkpoint=base,
        )
        api = f"http://127.0.0.1:{port}"
        status = lambda: httpx.get(api + "/status", timeout=5).json()  # noqa: E731

        msgs = sample_stream(docs)
        from kafka import KafkaProducer

        prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        for m in msgs:
            prod.send("cptd.documents", m)
        prod.flush()
        prod.close()
        print(
            f"5. stream       {len(msgs)} messages on topic cptd.documents: ML-library documentation (the new domain), "
            "junk, copies, broken messages"
        )

        vllm.wait_healthy(600)
        print(f"   vLLM up after {time.monotonic() - vllm_proc_start:.0f} s")
        before = _complete(vllm.url, PROMPT)

        daemon = DaemonProcess(env, root / "cptd.log").start().proc
        assert daemon is not None
        print(f"6. cptd         {api}  (logs: {root / 'cptd.log'}; try `CPTD_URL={api} cptd status`)")
        wait_for(lambda: status()["ingest"]["assigned"], 120, "the daemon to join the consumer group", 0.3, daemon)

        with Progress("ingest") as bar:

            def ingested() -> bool:
                done = status().get("counts", {}).get("total", 0)
                bar.update(done, len(msgs), f"{done}/{len(msgs)} messages")
                return done >= len(msgs)

            wait_for(ingested, 300, "the daemon to account for every message", 0.3, daemon)
        echoes = _stream_echoes(vllm.url, bootstrap, status, daemon)
        st = status()
        wait_for(lambda: status()["rounds"]["leader"], 60, "the daemon to take the round lease", 0.3, daemon)

        r = httpx.post(api + "/rounds", headers={"Authorization": f"Bearer {TOKEN}"}, json={"reason": "demo"}, timeout=30).json()
        rid = r.get("round")
        if not rid:
            raise RuntimeError(f"round not started: {r}")
        print(f"7. round {rid}  triggered (what `cptd trigger` does); following it:")
        requests = RequestLoop(vllm.url)
        try:
            rec = _follow_round(api, rid, daemon, requests, root / "checkpoints" / "rounds" / rid)
        finally:
            requests.stop()
        after = _complete(vllm.url, PROMPT)
        vllm_pid = vllm.proc.pid if vllm.proc is not None and vllm.proc.poll() is None else None
        _report(st, len(msgs) + echoes["messages"], rec, requests, vllm_pid, before, after, time.monotonic() - t_start, echoes)
        return 0 if rec["state"] == "DEPLOYED" else 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        if daemon is not None:
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGTERM)
                try:
                    daemon.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(daemon.pid, signal.SIGKILL)
            stopped.append("the daemon")
        if vllm is not None and vllm.proc is not None:
            vllm.stop()
            stopped.append("vLLM")
        for s in reversed(services):
            s.stop()
            stopped.append({"kafka": "Kafka", "redis": "Redis"}.get(s.name, s.name))
        if stopped:
            print("stopped " + (", ".join(stopped[:-1]) + " and " if len(stopped) > 1 else "") + stopped[-1])
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _stream_echoes(url: str, bootstrap: str, status: Callable[[], dict], daemon: subprocess.Popen, n: int = 40) -> dict:
    """The served model's outputs come back: its completions are logged to the echo topic, then half of them are
    posted again as they are and half with light edits, on the document topic. Returns what the daemon caught."""
    from kafka import KafkaProducer

    from daemon.dev.sample_corpus import english_docs, light_paraphrase

    rng = random.Random(11)
    prompts = list(dict.fromkeys(" ".join(d.split()[:12]) for d in english_docs(4 * n, 1024, seed=31)))[: 2 * n]
    body = {"model": "cptd", "prompt": prompts, "max_tokens": 160, "temperature": 0.8}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    # distinct completions of some length (a small model sometimes ends early or says the same thing twice)
    out = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    gens = list(dict.fromkeys(g for g in out if len(g.split()) >= 30))[:n]
    if len(gens) < n:
        raise RuntimeError(f"the served model gave only {len(gens)} distinct completions of 30 words or more to {len(prompts)} prompts")
    vocab = [w for d in english_docs(20, 1024, seed=32) for w in d.split()]
    back = [{"text": g, "id": f"echo-{i}"} for i, g in enumerate(gens[: n // 2])]
    back += [{"text": light_paraphrase(g, rng, vocab), "id": f"echo-{i}"} for i, g in enumerate(gens[n // 2 :], start=n // 2)]
    prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for g in gens:
        prod.send(COMPLETIONS_TOPIC, json.dumps({"text": g}).encode())
    prod.flush()
    wait_for(lambda: status().get("provenance", {}).get("echo_index", 0) >= len(gens), 120, "the echo index", 0.3, daemon)
    before = status()["counts"]["total"]
    for m in back:
        prod.send("cptd.documents", json.dumps(m).encode())
    prod.flush()
    prod.close()
    wait_for(lambda: status()["counts"]["total"] >= before + len(back), 120, "the echoes to be accounted for", 0.3, daemon)
    st = status()
    print(
        f"   echoes       {len(gens)} completions of the served model logged to {COMPLETIONS_TOPIC}; {len(back)} came back "
        f"({n // 2} as they were, {n - n // 2} lightly edited): {st['provenance'].get('echoes', 0)} caught as echoes"
    )
    caught = st["provenance"].get("echoes", 0)
    return {"completions": len(gens), "back": len(back), "messages": len(gens) + len(back), "caught": caught}


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _follow_round(api: str, rid: str, daemon: subprocess.Popen, requests: RequestLoop, round_dir: Path) -> dict:
    """Show each phase of the round until it ends; start `requests` the moment the swap is about to begin."""
    shown, bar, t0 = "", None, time.monotonic()
    scored = _EvalWatch(round_dir)
    try:
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with code {daemon.returncode}")
            rec = httpx.get(f"{api}/rounds/{rid}", timeout=10).json()
            state = rec["state"]
            if state in ("DEPLOYING", *TERMINAL):
                requests.start()  # late (the evaluator's end was missed): the report says how many overlapped the swap
            if state != shown:
                if bar is not None:
                    bar.close()
                bar = None if state in TERMINAL else Progress(state)
                shown = state
            if state in TERMINAL:
                print(f"   {state:<11} after {time.monotonic() - t0:.0f} s")
                return rec
            done, total, text = _phase_progress(rec)
            if requests.started:
                n, failed, _ = requests.count()
                text += f"  ({n} completions sent to vLLM meanwhile, {failed} failed)"
            assert bar is not None  # a state that is not terminal always has its bar
            bar.update(done, total, text)
            until = time.monotonic() + 0.5
            while time.monotonic() < until:
                if state == "EVALUATING" and not requests.started and scored.all_scored():
                    requests.start()
                time.sleep(0.05)
    finally:
        if bar is not None:
            bar.close()


class _EvalWatch:
    """Whether the round's evaluator has scored every model, read from its progress file as it is written.

    The gate and the swap follow the last score by the evaluator's exit and one gate decision (a
    second or less), sooner than the round record shows it, so the demo's requests start from here.
    """

    def __init__(self, round_dir: Path):
        self.spec = round_dir / "eval-spec.json"
        self.progress: Path | None = None

    def all_scored(self) -> bool:
        if self.progress is None:
            if not self.spec.exists():
                return False
            from daemon.jobs.specs import EvalSpec

            self.progress = EvalSpec.read(self.spec).progress_path
        try:
            last = json.loads(self.progress.read_text().splitlines()[-1])
        except (OSError, IndexError, ValueError):  # not written yet, or a line half written
            return False
        return last["total"] > 0 and last["scored"] >= last["total"]


def _phase_progress(rec: dict) -> tuple[float, float | None, str]:
    """(done, total, text) of the round's current phase, from its record."""
    state = rec["state"]
    if state == "TRAINING":
        p = (rec.get("train") or {}).get("progress") or {}
        if p.get("total_steps"):
            step = p.get("step") or 0
            return step, p["total_steps"], f"step {step}/{p['total_steps']}  loss {_num(p.get('loss'), '.3f')}"
        return 0, None, "starting the trainer"
    if state == "EVALUATING":
        ep = rec.get("eval_progress") or {}
        if ep.get("total"):
            return ep["scored"], ep["total"], f"{ep['scored']}/{ep['total']} models scored (serving + checkpoints)"
        return 0, None, "scoring the serving model and the round's checkpoints on held-out data"
    if state == "SNAPSHOT":
        return 0, None, "moving the buffer into the round, holding out a slice, measuring drift, drawing replay"
    if state == "DEPLOYING":
        return 0, None, "swapping weights into vLLM (pause, reload, verify, resume), then watching"
    return 0, None, ""


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _reason(r: str | dict) -> str:
    return r if isinstance(r, str) else str(r.get("message") or r.get("code") or r)


def _report(
    st: dict, n_msgs: int, rec: dict, requests: RequestLoop, vllm_pid: int | None, before: str, after: str, took: float, echoes: dict
) -> None:
    """Every line from the round record (GET /rounds/{id}), the daemon's /status or a measurement of the demo's own."""
    print("\n" + "=" * 78 + f"\nREPORT  round {rec['id']}: {rec['state']}" + (f"  ({rec['error']})" if rec.get("error") else ""))
    print("=" * 78)
    c = st["counts"]
    print(
        f"messages       {n_msgs} produced, {c['total']} accounted for: "
        + ", ".join(f"{k} {v}" for k, v in sorted(c["by_outcome"].items()))
    )
    pv = st.get("provenance") or {}
    print(
        f"provenance     accepted: human {pv.get('human', 0)}, unknown {pv.get('unknown', 0)}, synthetic {pv.get('synthetic', 0)}; "
        f"echoes: {echoes['caught']} of the {echoes['back']} documents the served model wrote were caught"
    )
    cur = rec.get("curation") or {}
    if cur:
        print(
            f"curation       {cur['chosen_docs']} of {cur['pool_docs']} candidates chosen; {cur['scored_docs']} scored by the served model "
            f"({_num(cur.get('scoring_docs_per_s'), '.0f')} docs/s), dropped {cur['dropped'] or 'none'}; "
            f"synthetic {cur['synthetic_share']:.1%} of new data (cap {cur['synthetic_cap']:.0%}"
            + (", binding: the rest waits" if cur["cap_binding"] else "")
            + ")"
        )
    snap = rec.get("snapshot") or {}
    if snap:
        print(
            f"round data     {snap['docs']} documents (~{snap['tokens_estimate']:,} tokens): {snap['train_docs']} trained, "
            f"{snap['heldout_docs']} held out; manifest sha256 {snap['manifest_sha256'][:16]}"
        )
    d = rec.get("drift") or {}
    s = d.get("stats") or {}
    if d:
        print(
            f"drift          score {_num(d.get('score'), '.3f')} ({d['level']}): "
            f"perplexity gap {_num(s.get('ppl_gap'), '+.3f')}, unigram JS distance {_num(s.get('js_distance'), '.3f')}"
        )
    tr = rec.get("train") or {}
    prog = tr.get("progress") or {}
    if rec.get("replay_ratio") is not None:
        line = f"replay ratio   {rec['replay_ratio']:.2f} planned"
        if d.get("replay_ratio") == rec["replay_ratio"]:
            line += f" (set by drift: {d['level']})"
        new_tok, replay_tok = prog.get("new_tokens"), prog.get("replay_tokens")
        if new_tok is not None and replay_tok is not None and new_tok + replay_tok:
            line += f"; trained on {replay_tok:,} replay + {new_tok:,} new tokens = {replay_tok / (new_tok + replay_tok):.2f} replay"
        print(line)
    sc = rec.get("schedule") or {}
    curve = tr.get("curve") or []
    if sc and curve:
        lrs = [x[2] for x in curve]
        set_by = [k for k, name in (("peak_lr", "peak"), ("warmup_frac", "warm-up")) if k in sc and d.get(k) == sc[k]]
        print(
            f"LR schedule    {sc.get('kind')}: peak {_num(sc.get('peak_lr'), '.2e')}, warm-up {_num(sc.get('warmup_frac'), '.0%')}"
            + (f" (set by drift: {d['level']})" if len(set_by) == 2 else "")
            + f"; ran {max(lrs):.2e} max, {lrs[-1]:.2e} last   {_spark(lrs)}"
        )
        losses = [x[1] for x in curve]
        print(f"train loss     {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps            {_spark(losses)}")
    for e in tr.get("evals") or []:
        print(
            f"  held-out @ step {e['step']:>3}: new {_num(e.get('loss_heldout_new'), '.3f')}   "
            f"replay {_num(e.get('loss_heldout_replay'), '.3f')}"
        )
    ev = rec.get("eval") or {}
    if ev:
        print(
            f"eval           serving model: new {_num(ev['serving'].get('new_nll'), '.3f')}, "
            f"replay {_num(ev['serving'].get('replay_nll'), '.3f')} nats/token"
        )
        for cnd in ev.get("candidates") or []:
            print(f"               {cnd['name']:<14} new {_num(cnd.get('new_nll'), '.3f')}, replay {_num(cnd.get('replay_nll'), '.3f')}")
    g = rec.get("gate") or {}
    if g:
        print(f"gate           {'ACCEPTED' if g['accepted'] else 'REJECTED'}: {_reason(g['reasons'][0]) if g.get('reasons') else ''}")
    dp = rec.get("deploy") or {}
    if dp:
        pause = dp.get("pause_seconds_max")
        print(
            f"swap           {'ok' if dp['ok'] else 'failed'}"
            + (f"; requests held for {pause * 1000:.0f} ms at most" if pause is not None else "")
            + (f"; vLLM process {vllm_pid} served before and after" if vllm_pid is not None else "")
        )
        t0, t1 = dp.get("started_at"), dp.get("finished_at")
        if requests.started and t0 and t1:
            n, failed, err = requests.count(t0, t1)
            total, total_failed, _ = requests.count()
            around = requests.elapsed()
            print(
                f"               {n} requests during the swap ({t1 - t0:.2f} s), {failed} failed"
                + (f" (first: {err})" if err else "")
                + f"; {total} in the {around:.0f} s around it, {total_failed} failed"
            )
            for line in requests.failures(t0):  # when, relative to the swap, and why: a failure away from it has another cause
                print(f"                 {line}")
    w = rec.get("watch") or {}
    if w:
        print(
            f"watch          {w['window_s']:.0f} s after the swap, {w['probes']} probes: "
            + (f"regression: {w['regression']}" if w.get("regression") else "no regression")
        )
    rb = rec.get("rollback") or {}
    if rb:
        print(
            f"rollback       {rb.get('trigger')}: to {rb.get('to')}, {'ok' if rb.get('ok') else 'failed'}"
            + (f" ({rb['reason']})" if rb.get("reason") else "")
        )
    fate = rec.get("docs") or {}
    if fate:
        print(
            f"documents      {fate['docs']} {fate['fate']}"
            + (f", {fate['replay_placed']} placed in the replay reservoir" if fate.get("replay_placed") is not None else "")
        )
    print(f"prompt         {PROMPT!r}")
    print(f"  before       {before!r}")
    print(f"  after        {after!r}")
    print(f"total time     {took:.0f} s")
