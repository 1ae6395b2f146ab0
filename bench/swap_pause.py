"""Hot swap vs restarting vLLM with the new checkpoint, on the same server and model, under load.

    python -m bench.swap_pause [--swaps 5] [--clients 4]

Baseline: what an operator does without cptd — stop the server and start it
on the new checkpoint. Measured: the time requests are held by our swap
(pause -> resume) and failed client requests, against the restart's time to
the first successful completion and its failed requests. Target: pause window
<= 1% of the restart time, zero failed requests.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from daemon.dev.services import wait_for
from daemon.serving import ServingController
from tests.vllm_fixtures import SERVED_NAME, build_tiny_models, start_server


class Load:
    """Clients sending greedy completions back to back; every failure is counted, none retried."""

    def __init__(self, url: str, clients: int):
        self.url, self.stop = url, threading.Event()
        self.ok = 0
        self.failed = 0
        self.done: list[tuple[float, float]] = []  # (sent, answered) of every successful request
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = http.post(
                        "/v1/completions", json={"model": SERVED_NAME, "prompt": f"the quick fox {i}", "max_tokens": 6, "temperature": 0}
                    )
                    good = r.status_code == 200
                except httpx.HTTPError:
                    good = False
                with self._lock:
                    if good:
                        self.ok += 1
                        self.done.append((sent, time.monotonic()))
                    else:
                        self.failed += 1
                if not good:
                    time.sleep(0.05)  # a refused connection returns at once; don't spin the shared CPU

    def first_ok_sent_after(self, t: float) -> float | None:
        with self._lock:
            return next((d for s, d in self.done if s >= t), None)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.ok, self.failed

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_for(lambda: self.counts()[0] >= len(self.threads), 60, "first completions of every client")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cptd-bench-swap-"))
    models = build_tiny_models(root)
    server = start_server(models, "vllm-bench.log")
    try:
        c = ServingController([server.url])
        c.adopt(str(models.base), "base")
        pauses, swap_walls = [], []
        with Load(server.url, args.clients) as load:
            ok0, failed0 = load.counts()
            for n in range(args.swaps):
                t = time.monotonic()
                rec = c.deploy(models.other if n % 2 == 0 else models.base, f"bench-{n}")
                swap_walls.append(time.monotonic() - t)
                if not rec.ok:
                    raise SystemExit(f"swap {n} failed: {rec.error}")
                pauses.append(rec.replicas[0].pause_seconds)
            ok1, failed1 = load.counts()
            swap_failed, swap_ok = failed1 - failed0, ok1 - ok0

            # Baseline on the same server and port: restart with the new checkpoint while clients keep sending.
            # Only a request sent after the old process is gone proves the new one serves.
            t0 = time.monotonic()
            server.stop()
            t_down = time.monotonic()
            server.restart(model=str(models.other), timeout=300)
            first = wait_for(lambda: load.first_ok_sent_after(t_down), 120, "first successful completion after restart")
            restart_s = first - t0
            ok2, failed2 = load.counts()
            restart_failed = failed2 - failed1
        c.close()
    finally:
        server.stop()

    pause_med, pause_max = statistics.median(pauses), max(pauses)
    print(
        f"hot swap ({args.swaps} swaps, {args.clients} clients): pause window median {pause_med * 1000:.1f} ms, "
        f"max {pause_max * 1000:.1f} ms; whole swap incl. validation+verification median "
        f"{statistics.median(swap_walls):.2f} s; {swap_ok} completions, {swap_failed} failed requests"
    )
    print(f"restart baseline: {restart_s:.1f} s to first successful completion; {restart_failed} failed requests")
    print(
        f"ratio pause/restart: median {pause_med / restart_s:.4%}, max {pause_max / restart_s:.4%} "
        f"(target <= 1%, zero failed: {'MET' if pause_max / restart_s <= 0.01 and swap_failed == 0 else 'NOT MET'})"
    )


if __name__ == "__main__":
    main()
