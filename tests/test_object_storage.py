"""Checkpoints only on object storage: a real S3 API server (moto's server mode, `.venv-moto`), no shared volume.

The base lives at s3://BUCKET/ck/base and vLLM boots from it with the Run:ai streamer (`--load-format
runai_streamer`), so it never sees a local checkpoint path. The daemon (in this process: real Redis, the runner and
its state machine, the trainer and evaluator as child processes) keeps only scratch in CHECKPOINT_DIR: it stages the
parent there, publishes the accepted candidate to s3://BUCKET/ck/rounds/ID/candidate after reading its safetensors
headers from the store, and vLLM reloads it from that URL. An operator rollback puts the base back from S3, and
retention deletes the round's objects. The checks of the store connector itself come first (no vLLM).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis as redis_lib

from connectors.object_store import COMPLETE, ObjectFiles, ObjectStore
from connectors.redis_store import BatchItem
from connectors.vllm import CheckpointError, Replica, tensor_inventory, validate_checkpoint
from daemon.app import Daemon
from daemon.dev.sample_corpus import domain_docs, english_docs
from daemon.dev.services import Service, free_port, wait_for
from daemon.dev.vllm_server import VLLMServer
from daemon.round_record import RoundState
from daemon.rounds import deploying, retention
from daemon.seed_replay import seed_replay
from daemon.settings import Settings
from policies.config import Policy
from tests.job_context import bare_record
from tests.vllm_fixtures import TinyModels

MOTO = Path(__file__).resolve().parents[1] / ".venv-moto" / "bin" / "moto_server"
BUCKET = "cptd-test"
URL = f"s3://{BUCKET}/ck"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server, and the AWS variables boto3 and vLLM's streamer both read pointing at it."""
    assert MOTO.exists(), f"{MOTO} missing: `make install-test` builds the S3 server's venv"
    d = tmp_path_factory.mktemp("moto")
    port = free_port()
    svc = Service("moto", port, [str(MOTO), "-H", "127.0.0.1", "-p", str(port)], d / "moto.log").start(timeout=60)
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",  # moto, like MinIO, has no per-bucket host names
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        wait_for(lambda: client.list_buckets() is not None, 60, "moto answering S3 calls", proc=svc.proc, log_path=svc.log_path)
        client.create_bucket(Bucket=BUCKET)
        yield url
    svc.stop()


@pytest.fixture(scope="module")
def store(s3_endpoint: str, tiny_models: TinyModels) -> ObjectStore:
    s = ObjectStore.connect()
    s.upload_dir(tiny_models.base, f"{URL}/base")
    return s


def keys(store: ObjectStore, url: str) -> set[str]:
    return {rel for rel, _ in store.objects(url)}


def test_copies_are_whole_and_headers_are_read_from_the_store(store: ObjectStore, tiny_models: TinyModels, tmp_path: Path):
    base = f"{URL}/base"
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE} <= keys(store, base)
    # Headers by ranged reads: the same inventory as the local file's, so a local candidate compares with a stored one.
    assert tensor_inventory(ObjectFiles(store, base)) == tensor_inventory(tiny_models.base)
    validate_checkpoint(tiny_models.other, ObjectFiles(store, base))  # other weights, same shapes: passes
    # A truncated upload has a valid header but too few bytes: refused before any replica sees it.
    blob = (tiny_models.other / "model.safetensors").read_bytes()
    bad = f"{URL}/scratch/truncated"
    store.upload_dir(tiny_models.other, bad)
    store.client.put_object(Bucket=BUCKET, Key="ck/scratch/truncated/model.safetensors", Body=blob[:-100])
    with pytest.raises(CheckpointError, match="truncated or padded"):
        validate_checkpoint(ObjectFiles(store, bad), ObjectFiles(store, base))
    # A prefix without its completion marker is an upload cut short: never downloaded as a checkpoint.
    store.client.delete_object(Bucket=BUCKET, Key=f"ck/scratch/truncated/{COMPLETE}")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        store.download_dir(bad, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    stored = len(keys(store, bad))
    assert stored > 0 and store.delete_prefix(f"{URL}/scratch") == stored and keys(store, f"{URL}/scratch") == set()
    got = store.download_dir(base, tmp_path / "base")
    assert (got / "model.safetensors").read_bytes() == (tiny_models.base / "model.safetensors").read_bytes()


def test_settings_refuse_what_object_storage_cannot_run():
    with pytest.raises(ValueError, match="s3:// URL"):
        Settings(checkpoint_url="/checkpoints")
    with pytest.raises(ValueError, match="kubernetes is not supported"):
        Settings(checkpoint_url=URL, train_launcher="kubernetes")
    s = Settings(checkpoint_url=URL + "/")
    assert s.base_checkpoint_ref() == f"{URL}/base"
    lora = Policy.model_validate({"name": "x", "train": {"mode": "lora"}})
    assert "full-weight rounds only" in (s.policy_refusal(lora) or "")
    detector = Policy.model_validate({"name": "x", "collapse": {"detector": True}})
    assert "not staged from object storage" in (s.policy_refusal(detector) or "")
    assert s.policy_refusal(Policy.model_validate({"name": "x"})) is None


@pytest.fixture(scope="module")
def s3_vllm(store: ObjectStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """A replica that boots from the store and has no checkpoint on any disk it shares with the daemon."""
    logs = tmp_path_factory.mktemp("s3-vllm")
    server = VLLMServer(
        model=f"{URL}/base", dtype="float32", extra_args=["--load-format", "runai_streamer"], log_path=logs / "vllm.log"
    ).start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


ROUND_POLICY = {
    "name": "objects",
    "train": {
        "seq_len": 64, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 6, "eval_interval": 6, "checkpoint_interval": 6,
        "keep_checkpoints": 1, "device": "cpu", "precision": "fp32",
    },
    "schedule": {"kind": "rewarm_cosine", "peak_lr": 3e-3, "warmup_frac": 0.1},
    "replay": {"mode": "fixed", "fixed_ratio": 0.2, "reservoir_docs": 100},
    "drift": {"probe_docs": 8, "probe_max_len": 64},
    "rounds": {"heldout_frac": 0.2, "heldout_max_docs": 6, "replay_heldout_docs": 6, "eval_checkpoints": 0, "keep_rounds": 1},
    "gates": {"max_forgetting_nats": 5.0, "min_adaptation_nats": -5.0},
}  # fmt: skip


def test_a_round_runs_with_checkpoints_only_on_the_store(
    s3_vllm: VLLMServer, store: ObjectStore, redis_client: redis_lib.Redis, tmp_path: Path
):
    policy = Policy.model_validate(ROUND_POLICY)
    kw = redis_client.connection_pool.connection_kwargs
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps(policy.model_dump(mode="json")))
    scratch = tmp_path / "scratch"  # the daemon's emptyDir: nothing vLLM reads
    settings = Settings(
        redis_url=f"redis://{kw['host']}:{kw['port']}/0", checkpoint_dir=scratch, policy=policy_file, vllm_urls=s3_vllm.url,
        checkpoint_url=URL, train_cpu_threads=1,
    )  # fmt: skip
    d = Daemon(policy, settings)
    ctx = d.runner.ctx
    ctx.fence = d.store.lease_acquire(ctx.owner, 120)
    d.runner.take_over()
    assert ctx.serving is not None and ctx.serving.state.versions["base"].checkpoint == f"{URL}/base"
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"text": t}) + "\n" for t in english_docs(30, 1024, seed=21)))
    assert seed_replay(seed, d.store, policy, random.Random(0)).placed == 30
    texts = domain_docs(40, seed=1)
    items = [BatchItem("docs", 0, i, "candidate", "", f"doc{i}", len(t), (), {"text": t, "bytes": len(t)}) for i, t in enumerate(texts)]
    d.store.write_batch(items, max_exact_keys=1000)
    rid = d.runner.create(policy, "manual", "test", None)

    rec = d.runner.drive(rid)

    assert rec.state == RoundState.DEPLOYED, rec.error or rec.gate
    candidate = f"{URL}/rounds/{rid}/candidate"
    assert rec.candidate == candidate and {"model.safetensors", "config.json", COMPLETE} <= keys(store, candidate)
    replica = Replica(s3_vllm.url)
    assert replica.weight_version() == rid and replica.complete("The", 4)
    # Every checkpoint serving knows is a URL: the replica was never given a local path.
    assert {v.checkpoint for v in ctx.serving.state.versions.values()} == {f"{URL}/base", candidate}
    assert rec.deploy is not None and rec.deploy.ok and rec.deploy.checkpoint == candidate

    back = deploying.rollback(ctx)
    assert back.ok and back.to == "base" and replica.weight_version() == "base"
    assert replica.fingerprint() == ctx.serving.state.versions["base"].fingerprint
    assert ctx.get_round(rid).state == RoundState.ROLLED_BACK

    # A newer round ends (keep_rounds 1): the rolled-back round's directory and its objects go; the base stays.
    ctx.put(bare_record("r09999", RoundState.FAILED))
    (scratch / "rounds" / "r09999").mkdir(parents=True)
    retention.tidy(ctx)
    assert keys(store, f"{URL}/rounds/{rid}") == set() and not (scratch / "rounds" / rid).exists()
    assert COMPLETE in keys(store, f"{URL}/base")
    assert not any(p.name == "model.safetensors" for p in (scratch / "cache").rglob("*") if rid in str(p))
    replica.close()
    d.store.lease_release(ctx.fenced())
