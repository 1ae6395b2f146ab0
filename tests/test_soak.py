"""The CI-sized soak: three rounds of the real daemon under four faults, and the invariants that must survive them.

bench/soak.py at its smallest: two vLLM CPU replicas of a tiny Llama (started together), tiny rounds on a buffer
trigger, a stream drifting from Python prose to ML-library docs to the Debian handbook in German. The four faults
are the ones the current code survives and that cost seconds: the leading daemon SIGKILLed in a phase, a broker
restart, a leader change (two daemons), Redis SIGKILLed with appendfsync everysec. The full soak, with every fault
kind, is the bench command (bench/README.md).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench.soak import FAULTS, SoakConfig, run_soak, schedule
from bench.soak_report import summary
from daemon.dev.process_control import TcpProxy
from daemon.dev.services import free_port


def test_the_fault_schedule_is_seeded_spread_over_rounds_and_in_allowed_phases():
    kinds = list(FAULTS) * 2
    a, b = schedule(kinds, 5, seed=7), schedule(kinds, 5, seed=7)
    assert [vars(p) for p in a] == [vars(p) for p in b]
    assert [vars(p) for p in a] != [vars(p) for p in schedule(kinds, 5, seed=8)]
    per_round = [sum(1 for p in a if p.round == r) for r in range(5)]
    assert max(per_round) - min(per_round) <= 1 and sum(per_round) == len(kinds)
    assert all(p.phase in FAULTS[p.kind].phases for p in a)
    with pytest.raises(ValueError, match="unknown fault kinds \\['nope'\\]"):
        schedule(["nope"], 3, 0)


def test_a_broker_restart_resets_open_connections_and_the_port_answers_again():
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", free_port()))
        upstream.listen(4)
        proxy = TcpProxy(upstream.getsockname()[1]).start()
        try:
            c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            server_side, _ = upstream.accept()
            c.sendall(b"ping")
            assert server_side.recv(4) == b"ping"
            proxy.stop()
            with pytest.raises(ConnectionError):  # reset, as a restarting broker's clients see it
                c.sendall(b"x" * 65536)
                c.recv(1)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            proxy.start()
            c2 = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s2, _ = upstream.accept()
            c2.sendall(b"pong")
            assert s2.recv(4) == b"pong"
            for x in (c, c2, server_side, s2):
                x.close()
        finally:
            proxy.stop()


@pytest.mark.slow  # two vLLM starts, the broker, Redis, two daemons and three rounds: 180-190 s on 2 cores
@pytest.mark.timeout(1200)
def test_three_rounds_under_four_faults_keep_every_invariant(tmp_path: Path):
    cfg = SoakConfig(
        rounds=3,
        faults=["daemon_kill", "leader_change", "redis_kill", "broker_restart"],
        seed=1,
        replicas=2,
        docs_per_round=24,
        round_steps=8,
        heldout_docs=6,
        broker_down_s=3.0,
        round_timeout_s=300.0,
        workdir=tmp_path / "soak",
        png=False,
    )
    report = run_soak(cfg, log=print)
    text = summary(report)
    assert report["findings"] == [], text
    inv = report["invariants"]
    a = report["accounting"]
    assert a["produced"] == a["accounted"] == 3 * (24 + 2), text  # every message, exactly once
    assert a["dead_letter_distinct"] == a["dead_letter_expected"] >= 6, text  # the broken ones, at least
    assert inv["rounds_terminal_with_reason"] and report["rounds"]["started"] >= 3, text
    assert inv["replicas_left_paused"] == 0 and inv["replicas_agree"], text
    fired = [f for f in report["faults"] if f["fired_in"]]
    assert len(fired) == 4 and not [f for f in fired if "failed" in f["note"]], text
    # the daemon deployed something: versions moved past the base on both replicas
    assert any(r["state"] == "DEPLOYED" for r in report["rounds"]["list"]), text
    assert report["freshness_s"]["docs"] > 0, text
