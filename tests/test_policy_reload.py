"""Policy hot-reload: valid edits apply, invalid ones are refused with the field named, ConfigMap symlink swaps are seen."""

from __future__ import annotations

import os

import httpx

from daemon import metrics as M
from daemon.dev.services import create_topics, wait_for
from daemon.policy_watch import PolicyWatcher
from policies.config import load_policy, policy_hash
from tests.conftest import make_policy


def _errors() -> float:
    return M.REGISTRY.get_sample_value("cptd_policy_reload_errors_total") or 0.0


def test_valid_edit_applies_and_invalid_edit_is_refused(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("name: x\nbuffer: {max_docs: 100}\n")
    applied = []
    w = PolicyWatcher(path, load_policy(path), applied.append)
    assert w.check() == (False, "unchanged")
    path.write_text("name: x\nbuffer: {max_docs: 50}\n")
    changed, _ = w.check()
    assert changed and applied[-1].buffer.max_docs == 50
    before = _errors()
    path.write_text("name: x\nbuffer: {max_docs: -3}\n")
    changed, msg = w.check()
    assert not changed and "buffer.max_docs" in msg and w.last_error
    assert w.current.buffer.max_docs == 50 and len(applied) == 1
    assert _errors() == before + 1
    path.write_text("# reformatted only\nbuffer:\n  max_docs: 50\nname: x\n")
    assert w.check()[0] is False and w.last_error is None and len(applied) == 1


def test_configmap_symlink_swap_is_seen(tmp_path):
    """The kubelet's layout: policy.yaml -> ..data/policy.yaml, ..data -> ..<timestamp>/ swapped atomically."""
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "policy.yaml").write_text("name: x\nbuffer: {max_docs: 10}\n")
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/policy.yaml", mount / "policy.yaml")
    applied = []
    w = PolicyWatcher(mount / "policy.yaml", load_policy(mount / "policy.yaml"), applied.append)
    (mount / "..v2").mkdir()
    (mount / "..v2" / "policy.yaml").write_text("name: x\nbuffer: {max_docs: 20}\n")
    os.symlink("..v2", mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert w.check()[0] and applied[-1].buffer.max_docs == 20


def test_running_daemon_reloads_and_refuses(tmp_path, topics, bootstrap, redis_url, ingest_procs):
    create_topics(bootstrap, {topics["docs"]: 1, topics["dlq"]: 1})
    path = make_policy(tmp_path, topics)
    proc = ingest_procs(path, redis_url, bootstrap)
    proc.wait_assigned()
    h0 = proc.status()["policy_hash"]
    url = f"http://127.0.0.1:{proc.port}/policy/reload"
    assert httpx.post(url, timeout=10).status_code == 401  # mutating route without the token

    text = path.read_text()
    path.write_text(text.replace("batch_max_docs: 100", "batch_max_docs: 40"))
    h1 = policy_hash(load_policy(path))
    wait_for(lambda: proc.status()["policy_hash"] == h1, 30, "the daemon to pick up the valid edit", 0.2, proc.proc)
    assert h1 != h0

    path.write_text(text.replace("batch_max_docs: 100", "batch_max_docs: 0"))
    r = httpx.post(url, headers={"Authorization": "Bearer test-token"}, timeout=10)
    assert r.status_code == 422 and "ingest.batch_max_docs" in r.json()["error"]
    status = proc.status()
    assert status["policy_hash"] == h1 and "ingest.batch_max_docs" in status["policy_error"]
    metrics = httpx.get(f"http://127.0.0.1:{proc.port}/metrics", timeout=5).text
    assert "cptd_policy_reload_errors_total 1.0" in metrics
    assert proc.proc.poll() is None  # still running on the old policy


def test_a_policy_the_launcher_cannot_run_is_refused_at_load_and_the_old_one_stays(tmp_path):
    """cpu_offload is FSDP's: with the one-rank subprocess launcher it is refused when the policy loads, not at
    TRAINING after a round took its documents."""
    from daemon.settings import Settings

    path = tmp_path / "policy.yaml"
    path.write_text("name: x\ntrain: {parallelism: fsdp}\n")
    local, sharded = Settings(train_launcher="subprocess"), Settings(train_launcher="torchrun:2")
    applied = []
    w = PolicyWatcher(path, load_policy(path), applied.append, local.policy_refusal)
    path.write_text("name: x\ntrain: {parallelism: fsdp, cpu_offload: true}\n")
    changed, msg = w.check()
    assert not changed and "train.cpu_offload" in msg and "CPTD_TRAIN_LAUNCHER=subprocess" in msg
    assert w.current.train.cpu_offload is False and applied == []
    assert sharded.policy_refusal(load_policy(path)) is None  # several ranks: the same file is fine


def test_lm_eval_suites_without_the_harness_extra_are_refused_when_the_policy_loads(tmp_path, monkeypatch):
    """An install without cptd[harness] (the image's default) refuses a policy naming lm-eval task YAMLs at load,
    naming the extra, instead of failing every round at EVALUATING."""
    import importlib.util

    from daemon import settings as settings_module
    from daemon.settings import Settings

    path = tmp_path / "policy.yaml"
    path.write_text("name: x\nrounds: {suites: {arc: arc.yaml, mine: mc.jsonl}}\n")
    policy, s = load_policy(path), Settings()
    assert s.policy_refusal(policy) is None  # this venv has lm-eval
    real = importlib.util.find_spec
    monkeypatch.setattr(settings_module.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    why = s.policy_refusal(policy)
    assert why is not None and "rounds.suites ['arc']" in why and "cptd[harness]" in why
