"""Hot swap, rollback, LoRA, watch and crash recovery against real vLLM CPU servers."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from safetensors.torch import load_file, save_file

from connectors.redis_store import Fenced, RedisStore
from connectors.vllm import ServingConfig, ServingError, request_errors
from daemon import metrics
from daemon.dev.services import free_port
from daemon.round_record import Parent, RoundState
from daemon.rounds.context import RoundContext
from daemon.rounds.state_machine import drive
from daemon.serving import ServingController, ServingState
from daemon.settings import Settings
from policies.config import Policy
from tests.job_context import bare_record
from tests.vllm_fixtures import SERVED_NAME, TinyModels, reset_to_base

PROMPT = "the quick fox of round"


def _handler_count(url: str, handler: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("http_requests_total{") and f'handler="{handler}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def controller(vllm_server, tiny_models: TinyModels):
    reset_to_base(vllm_server.url, tiny_models.base)
    saved: list[str] = []
    c = ServingController([vllm_server.url], on_state=lambda s: saved.append(s.to_json()))
    c.adopt(str(tiny_models.base), "base")
    c.saved = saved  # type: ignore[attr-defined]
    yield c
    c.close()


def test_swap_changes_completion_and_version_and_rollback_restores(controller, tiny_models):
    r = controller.replicas[0]
    old = r.complete(PROMPT, 12)
    rec = controller.deploy(tiny_models.other, "round-1")
    assert rec.ok, rec.error
    assert r.weight_version() == "round-1"
    new = r.complete(PROMPT, 12)
    assert new != old
    assert rec.replicas[0].fingerprint != controller.state.versions["base"].fingerprint
    assert controller.live_version(r.url) == "round-1"
    print(f"\nswap pause window: {rec.replicas[0].pause_seconds * 1000:.1f} ms; {old!r} -> {new!r}")

    back = controller.rollback()
    assert back.ok, back.error
    assert r.weight_version() == "base"
    assert r.complete(PROMPT, 12) == old
    # The persisted state (what the daemon keeps in Redis) agrees with the server.
    last = ServingState.from_json(controller.saved[-1])
    assert last.replicas[r.url].version == "base" and last.replicas[r.url].status == "serving"


def test_ten_swaps_under_concurrent_load_drop_no_request(controller, tiny_models, vllm_server):
    stop = threading.Event()
    ok = [0] * 4
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=vllm_server.url, timeout=120) as http:
            while not stop.is_set():
                try:
                    resp = http.post(
                        "/v1/completions", json={"model": SERVED_NAME, "prompt": f"{PROMPT} {i}", "max_tokens": 6, "temperature": 0}
                    )
                    if resp.status_code == 200 and resp.json()["choices"]:
                        ok[i] += 1
                    else:
                        with lock:
                            failures.append(f"client {i}: HTTP {resp.status_code} {resp.text[:200]}")
                except Exception as e:  # noqa: BLE001 - every client-side failure is counted
                    with lock:
                        failures.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    pauses = []
    try:
        # Let every client get requests in flight before the first swap.
        deadline = time.monotonic() + 60
        while min(ok) == 0 and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
        assert min(ok) > 0, f"clients did not get going: {ok} {failures[:3]}"
        before = sum(ok)
        for n in range(10):
            ckpt = tiny_models.other if n % 2 == 0 else tiny_models.base
            rec = controller.deploy(ckpt, f"load-{n}")
            assert rec.ok, rec.error
            pauses.append(rec.replicas[0].pause_seconds)
        during = sum(ok) - before
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    assert not failures, failures[:5]
    assert during > 0
    assert controller.replicas[0].weight_version() == "load-9"
    print(
        f"\n10 swaps under 4 clients: {during} completions during swaps, {len(failures)} failed; "
        f"pause window max {max(pauses) * 1000:.1f} ms, mean {sum(pauses) / len(pauses) * 1000:.1f} ms"
    )


def _corrupt_variants(src: Path, root: Path) -> dict[str, Path]:
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, Path] = {}

    def variant(name: str, t: dict | None) -> Path:
        d = root / name
        shutil.copytree(src, d)
        if t is not None:
            save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    missing = dict(tensors)
    missing.pop("model.layers.1.mlp.down_proj.weight")
    out["missing"] = variant("missing", missing)
    wrong = dict(tensors)
    w = wrong["model.layers.0.self_attn.q_proj.weight"]
    wrong["model.layers.0.self_attn.q_proj.weight"] = w[: w.shape[0] // 2].contiguous()
    out["wrong_shape"] = variant("wrong_shape", wrong)
    truncated = variant("truncated", None)
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    out["truncated"] = truncated
    return out


def test_corrupt_candidates_rejected_before_server_is_touched(controller, tiny_models, tmp_path, vllm_server):
    r = controller.replicas[0]
    old = r.complete(PROMPT, 12)
    touched_before = {h: _handler_count(vllm_server.url, h) for h in ("/pause", "/collective_rpc")}
    expect = {
        "missing": "missing tensor model.layers.1.mlp.down_proj.weight",
        "wrong_shape": "model.layers.0.self_attn.q_proj.weight",
        "truncated": "truncated",
    }
    for kind, path in _corrupt_variants(tiny_models.other, tmp_path).items():
        rec = controller.deploy(path, f"bad-{kind}")
        assert not rec.ok
        assert rec.error["step"] == "validate"
        assert any(expect[kind] in p for p in rec.rejected), (kind, rec.rejected)
    assert {h: _handler_count(vllm_server.url, h) for h in touched_before} == touched_before
    assert r.weight_version() == "base"
    assert r.complete(PROMPT, 12) == old


def test_lora_round_adapters_get_new_names_and_old_ones_unload(vllm_server, tiny_models):
    reset_to_base(vllm_server.url, tiny_models.base)
    c = ServingController([vllm_server.url], config=ServingConfig(lora_prefix=f"t{int(time.time())}", lora_keep=2))
    c.adopt(str(tiny_models.base), "base")
    r = c.replicas[0]
    base = r.complete(PROMPT, 12)
    names, outs = [], []
    for v, path in (("r1", tiny_models.lora1), ("r2", tiny_models.lora2)):
        rec = c.deploy_lora(path, v, max_rank=8)
        assert rec.ok, rec.error
        names.append(rec.route_model)
    assert names[0] != names[1]
    listed = {m["id"] for m in r.models()}
    assert set(names) <= listed
    for n in names:  # both versions serve, and each is really its own adapter
        outs.append(r.complete(PROMPT, 12, model=n))
    assert outs[0] != outs[1] and base not in outs
    again = c.deploy_lora(tiny_models.lora1, "r2")  # a round id reused: refused, never reloaded under the same name
    assert not again.ok and again.error["step"] == "validate"

    rec = c.deploy_lora(tiny_models.lora3, "r3", max_rank=8)
    assert rec.ok, rec.error
    listed = {m["id"] for m in r.models()}
    assert names[0] not in listed and names[1] in listed and rec.route_model in listed
    with pytest.raises(ServingError) as e:
        r.complete(PROMPT, 4, model=names[0])
    assert e.value.replica == vllm_server.url
    assert c.state.lora_active == rec.route_model and c.state.lora_versions == [names[1], rec.route_model]
    # A full-weight swap resets the worker's LoRA state; the active adapter must still serve, on the new base.
    on_old_base = r.complete(PROMPT, 12, model=rec.route_model)
    assert c.deploy(tiny_models.other, "lora-base-2").ok
    on_new_base = r.complete(PROMPT, 12, model=rec.route_model)
    assert on_new_base != on_old_base
    assert on_new_base != r.complete(PROMPT, 12)  # the adapter is still applied, not silently dropped
    assert c.rollback().ok and r.complete(PROMPT, 12, model=rec.route_model) == on_old_base
    for n in c.state.lora_versions:
        r.unload_lora(n)
    c.close()


def test_watch_rolls_back_a_regressed_replica(controller, tiny_models, vllm_server):
    r = controller.replicas[0]
    old = r.complete(PROMPT, 12)
    assert controller.deploy(tiny_models.other, "round-w").ok
    healthy = controller.watch(window_s=1.5)
    assert healthy.regression is None and healthy.rollback is None and len(healthy.probes) >= 2
    # A real regression on the live server: its weights are zeroed behind the daemon's back.
    httpx.post(vllm_server.url + "/weight_checker", json={"action": "reset"}, timeout=30).raise_for_status()
    rec = controller.watch(window_s=5.0)
    assert rec.regression and "smoke completion changed" in rec.regression
    assert rec.rollback is not None and rec.rollback.ok, rec.rollback
    assert r.weight_version() == "base" and r.complete(PROMPT, 12) == old
    json.dumps(rec.to_dict())
    assert request_errors(r.metrics_text()) == 0


def test_two_replicas_deploy_one_at_a_time(controller, tiny_models, vllm_server, vllm_crash_server):
    reset_to_base(vllm_crash_server.url, tiny_models.base)
    c = ServingController([vllm_server.url, vllm_crash_server.url])
    c.adopt(str(tiny_models.base), "base")
    rec = c.deploy(tiny_models.other, "round-2r")
    assert rec.ok, rec.error
    assert [x.replica for x in rec.replicas] == [vllm_server.url, vllm_crash_server.url]
    texts = {r.url: (r.weight_version(), r.complete(PROMPT, 12)) for r in c.replicas}
    assert len(set(texts.values())) == 1 and next(iter(texts.values()))[0] == "round-2r"
    assert c.rollback().ok
    assert {r.weight_version() for r in c.replicas} == {"base"}
    c.close()


def test_server_killed_mid_swap_rolls_back_others_and_reconciles(tiny_models, vllm_server, vllm_crash_server, tmp_path):
    reset_to_base(vllm_server.url, tiny_models.base)
    reset_to_base(vllm_crash_server.url, tiny_models.base)
    state_file = tmp_path / "serving-state.json"
    killed: list[str] = []

    def persist(state: ServingState) -> None:
        state_file.write_text(state.to_json())  # the daemon writes the same JSON to Redis
        crash = state.replicas.get(vllm_crash_server.url)
        if crash is not None and crash.step == "reload_weights" and not killed:
            killed.append(crash.step)
            vllm_crash_server.kill()  # the process dies between pause and reload

    c = ServingController(
        [vllm_server.url, vllm_crash_server.url],
        on_state=persist,
        config=ServingConfig(retries=1, retry_backoff_s=0.2, timeout_s=10),
    )
    c.adopt(str(tiny_models.base), "base")
    old = c.replicas[0].complete(PROMPT, 12)
    rec = c.deploy(tiny_models.other, "round-crash")
    assert killed and not rec.ok
    assert rec.error["replica"] == vllm_crash_server.url and rec.error["step"] == "reload_weights"
    assert rec.replicas[0].ok  # the first replica had been swapped ...
    back = {x.replica: x for x in rec.rolled_back}
    assert back[vllm_server.url].ok  # ... and went back
    assert c.replicas[0].weight_version() == "base" and c.replicas[0].complete(PROMPT, 12) == old
    saved = ServingState.from_json(state_file.read_text())
    assert saved.replicas[vllm_crash_server.url].version is None  # never claims a version it cannot vouch for
    assert saved.replicas[vllm_crash_server.url].status == "failed"
    c.close()

    vllm_crash_server.start(timeout=300)  # what Kubernetes does: same pod spec, boot checkpoint
    fresh = ServingController(
        [vllm_server.url, vllm_crash_server.url], state=ServingState.from_json(state_file.read_text()), on_state=persist
    )
    rep = fresh.reconcile()
    assert rep.live == {vllm_server.url: "base", vllm_crash_server.url: "base"}, rep
    assert rep.diverged == []
    for r in fresh.replicas:
        assert fresh.live_version(r.url) == r.weight_version() == "base"
    assert ServingState.from_json(state_file.read_text()).replicas[vllm_crash_server.url].status == "serving"
    fresh.close()


def test_lora_refusal_reads_the_server_flags(vllm_server, vllm_plain_server):
    c = ServingController([vllm_server.url])
    info = c.replicas[0].server_info()
    assert (info.lora_enabled, info.max_lora_rank, info.max_loras, info.dtype, info.runtime_lora_updating) == (
        True,
        8,
        2,
        "float32",
        True,
    )
    assert c.lora_refusal(8) is None
    msg = c.lora_refusal(16)
    assert msg and vllm_server.url in msg and "--max-lora-rank 8 < policy train.lora_r 16" in msg
    c.close()

    plain = ServingController([vllm_server.url, vllm_plain_server.url])
    info = plain.replicas[1].server_info()
    # Started with the default dtype from a bf16 checkpoint: served in bf16, not vLLM's fp32->bf16 "auto" guess.
    assert (info.lora_enabled, info.max_lora_rank, info.dtype) == (False, None, "bfloat16")
    msg = plain.lora_refusal(8)
    assert msg == f"vLLM replica {vllm_plain_server.url}: started without --enable-lora"
    plain.close()

    gone = ServingController([f"http://127.0.0.1:{free_port()}"], config=ServingConfig(retries=0, timeout_s=2))
    msg = gone.lora_refusal(8)
    assert msg and "/server_info unreachable" in msg and "VLLM_SERVER_DEV_MODE=1" in msg
    gone.close()


def _rollbacks(trigger: str) -> float:
    return metrics.ROLLBACKS.labels(trigger=trigger)._value.get()


def test_lora_rollback_goes_back_one_adapter_then_to_the_base_model(vllm_server, tiny_models):
    reset_to_base(vllm_server.url, tiny_models.base)
    saved: list[str] = []
    c = ServingController(
        [vllm_server.url],
        on_state=lambda s: saved.append(s.to_json()),
        config=ServingConfig(lora_prefix=f"rb{int(time.time())}", lora_keep=2),
    )
    c.adopt(str(tiny_models.base), "base")
    r = c.replicas[0]
    try:
        assert c.route_model() == SERVED_NAME
        n1 = c.deploy_lora(tiny_models.lora1, "r1", max_rank=8).route_model
        rec = c.deploy_lora(tiny_models.lora2, "r2", max_rank=8)
        assert rec.ok, rec.error
        n2 = rec.route_model
        assert n1 and n2 and c.route_model() == n2
        assert c.state.lora_paths == {n1: str(tiny_models.lora1.resolve()), n2: str(tiny_models.lora2.resolve())}
        out1 = r.complete(PROMPT, 12, model=n1)
        # The server loses r1 behind the daemon's back (as in a restart): the rollback loads it again from its path.
        r.unload_lora(n1)
        before = _rollbacks("operator")
        back = c.rollback_lora()
        assert back.ok, back.error
        assert back.kind == "lora_rollback" and back.route_model == n1
        assert "load_lora_adapter" in [s.step for s in back.replicas[0].steps]
        assert _rollbacks("operator") == before + 1
        assert c.state.lora_active == c.route_model() == n1 and c.state.lora_versions == [n1]
        assert r.complete(PROMPT, 12, model=n1) == out1
        listed = r.model_ids()
        assert n1 in listed and n2 not in listed
        last = ServingState.from_json(saved[-1])
        assert last.lora_active == n1 and last.lora_paths == {n1: str(tiny_models.lora1.resolve())}

        # Reconcile loads a lost kept adapter again and says so.
        r.unload_lora(n1)
        rep = c.reconcile()
        assert rep.lora_reloaded == {vllm_server.url: [n1]} and not rep.errors, rep
        assert r.complete(PROMPT, 12, model=n1) == out1

        base = c.rollback_lora(trigger="watch")
        assert base.ok, base.error
        assert base.route_model == SERVED_NAME and c.state.lora_active is None
        assert c.route_model() == SERVED_NAME and c.state.lora_versions == [] and c.state.lora_paths == {}
        assert n1 not in r.model_ids()
        with pytest.raises(ValueError, match="nothing to roll back to"):
            c.rollback_lora()
    finally:
        for name in r.model_ids():
            if name.startswith(c.config.lora_prefix):
                r.unload_lora(name)
        c.close()


def test_serving_state_without_lora_paths_still_loads():
    old = json.dumps({"lora_active": "cptd-r1", "lora_versions": ["cptd-r1"]})  # written before lora_paths existed
    state = ServingState.from_json(old)
    assert state.lora_paths == {} and state.lora_active == "cptd-r1"


@pytest.mark.parametrize("save_error", [redis.exceptions.ConnectionError("Redis went away"), Fenced("another daemon holds the lease")])
def test_a_state_save_failing_while_paused_still_resumes_the_replica(vllm_server, tiny_models, save_error):
    """The save right after /pause raises (Redis down, lease lost): the error reaches the caller, the replica is resumed."""
    reset_to_base(vllm_server.url, tiny_models.base)
    fail = [True]

    def save(state: ServingState) -> None:
        rs = state.replicas.get(vllm_server.url)
        if rs is not None and rs.step == "pause" and rs.version is None and fail:  # paused: weights about to change
            fail.clear()
            raise save_error

    c = ServingController([vllm_server.url], on_state=save)
    try:
        c.adopt(str(tiny_models.base), "base")
        with pytest.raises(type(save_error)):
            c.deploy(tiny_models.other, "round-save-fails")
        assert not fail  # the failure did happen, after the pause
        r = c.replicas[0]
        assert not r.is_paused()
        assert r.weight_version() == "base" and r.fingerprint() == c.state.versions["base"].fingerprint
    finally:
        c.close()


@pytest.mark.parametrize("outage_s", [0, 120], ids=["no-outage-allowance", "outage-waited-out"])
def test_a_deploy_cut_short_by_redis_never_leaves_the_replica_paused_or_between_versions(
    vllm_server, tiny_models, redis_client, tmp_path, outage_s
):
    """After the reload, the state save raises a Redis error. With no outage allowance the round ends FAILED only once
    the replica is back on base; with one (`rounds.redis_outage_s`, the default) DEPLOYING is run again and the round
    ends DEPLOYED. Either way the replica is resumed and serves one version that the saved state names."""
    reset_to_base(vllm_server.url, tiny_models.base)
    store = RedisStore(redis_client, f"swapcut{outage_s}")
    policy = Policy.model_validate({"rounds": {"redis_outage_s": outage_s}})
    ctx = RoundContext(store, Settings(checkpoint_dir=tmp_path), get_policy=lambda: policy, owner="swap-test")
    ctx.fence = store.lease_acquire(ctx.owner, 120)
    fail = [True]

    def save(state: ServingState) -> None:
        if state.replicas[vllm_server.url].step == "reset_prefix_cache" and fail:  # new weights loaded, label still "base"
            fail.clear()
            raise redis.exceptions.ConnectionError("Redis went away")
        store.put_serving(ctx.fenced(), state.to_json())

    ctx.serving = ServingController([vllm_server.url], on_state=save)
    try:
        ctx.serving.adopt(str(tiny_models.base), "base")
        rec = bare_record("r00001", RoundState.DEPLOYING)
        rec.owner, rec.policy, rec.candidate = ctx.owner, Policy(), str(tiny_models.other)
        rec.parent = Parent(version="base", checkpoint=str(tiny_models.base))
        ctx.put(rec)
        out = drive(ctx, rec.id)
        assert not fail
        r = ctx.serving.replicas[0]
        assert not r.is_paused()
        assert not ctx.reconcile_due
        served = "base" if outage_s == 0 else "r00001"
        if outage_s == 0:
            assert out.state == RoundState.FAILED
            assert out.error is not None and "ConnectionError" in out.error, out.error
        else:
            assert out.state == RoundState.DEPLOYED, out.error
        assert r.weight_version() == served and r.fingerprint() == ctx.serving.state.versions[served].fingerprint
        saved = ServingState.from_json(store.get_serving() or "")
        assert saved.desired_version == served and saved.replicas[vllm_server.url].version == served
    finally:
        ctx.serving.close()
