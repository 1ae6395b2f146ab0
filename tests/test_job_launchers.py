"""One way to run a job (daemon/job_launchers.py) and the loop a round follows it with (RoundContext.run_job).

Real child processes of a real job module (daemon/jobs/device_check.py); the Kubernetes launcher is tested against a
fake API in tests/test_kubernetes_launcher.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from daemon.job_launchers import Job, JobFailed, JsonlFollower, ProcessLauncher, TorchrunLauncher, launcher_for, run_to_end
from daemon.jobs.specs import DeviceCheckSpec, TrainSpec
from daemon.rounds.context import RoundFailed, Stop
from daemon.settings import Settings
from tests.job_context import CancelFlag, bare_record, job_context


def _job(tmp_path: Path, device: str = "cpu") -> Job:
    spec = DeviceCheckSpec(device=device, out=str(tmp_path / "check.json"))
    return Job(spec, tmp_path / "check-spec.json", tmp_path / "check.log", round_id="r00001")


def test_a_job_writes_its_spec_and_its_result_is_the_one_answer(tmp_path):
    job = _job(tmp_path)
    out = run_to_end(job)
    assert out["device"] == "cpu" and "refusal" in out
    assert DeviceCheckSpec.read(job.spec_path) == job.spec  # the spec file the job read is the typed spec
    assert json.loads(Path(job.spec.out).read_text()) == out


def test_a_failed_job_names_its_module_exit_code_and_log_tail(tmp_path):
    with pytest.raises(JobFailed) as e:
        run_to_end(_job(tmp_path, device="tpu9"))  # torch refuses the device type: the job dies with a traceback
    msg = str(e.value)
    assert msg.startswith("daemon.jobs.device_check exited with code 1:") and "tpu9" in msg


def test_exit_zero_without_a_result_file_is_a_failure(tmp_path):
    class NoResult(ProcessLauncher):
        def command(self, job: Job) -> list[str]:
            return ["true"]

    with pytest.raises(JobFailed, match="exited 0 without writing"):
        run_to_end(_job(tmp_path), NoResult())


def test_cancel_stop_and_timeout_end_the_child_and_say_why(tmp_path, monkeypatch):
    store = CancelFlag()
    ctx = job_context(Settings(checkpoint_dir=tmp_path), store)
    started: list[ProcessLauncher] = []

    class Sleeper(ProcessLauncher):  # a job that never ends by itself
        def command(self, job: Job) -> list[str]:
            started.append(self)
            return ["sleep", "600"]

    monkeypatch.setattr("daemon.rounds.context.launcher_for", lambda *a, **k: Sleeper())
    store.cancel = True
    with pytest.raises(RoundFailed, match="cancelled by operator"):
        ctx.run_job(_job(tmp_path), bare_record())
    store.cancel = False
    with pytest.raises(RoundFailed, match="ran past 0.5 s"):
        ctx.run_job(_job(tmp_path), bare_record(), timeout=0.5)
    ctx.stop.set()
    with pytest.raises(Stop, match="stopping"):
        ctx.run_job(_job(tmp_path), bare_record())
    ctx.stop.clear()
    ctx.fence = None
    with pytest.raises(Stop, match="lease lost"):
        ctx.run_job(_job(tmp_path), bare_record())
    assert len(started) == 4 and all(s.proc is None for s in started)  # every child was ended, none left behind
    assert ctx.launcher is None


def test_launchers_follow_the_spec_the_trainer_on_all_ranks_other_jobs_as_one_process():
    check = DeviceCheckSpec(device="cuda", out="/o")
    assert type(launcher_for(Settings(train_launcher="torchrun:4"), check)) is ProcessLauncher  # one process, not torchrun
    torchrun = launcher_for(Settings(train_launcher="torchrun:4"), TrainSpec(parent_dir="/p", out_dir="/o", new_path="/n"))
    assert isinstance(torchrun, TorchrunLauncher) and torchrun.name == "torchrun:4"
    spec = TrainSpec(parent_dir="/p", out_dir="/o", new_path="/n")
    cmd = torchrun.command(Job(spec, Path("/s.json"), Path("/l.log")))
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "-m"] and cmd[-2:] == ["daemon.jobs.trainer", "/s.json"]


def test_every_job_that_loads_a_model_goes_where_the_trainer_does_and_the_memory_plan_stays_in_the_daemon():
    """CPTD_TRAIN_LAUNCHER=kubernetes: the evaluator, drift probe, detector and device check are Kubernetes Jobs (the
    daemon's pod has no GPU there); the memory plan, on fake tensors, is a child process of the daemon."""
    from kubernetes import client as k8s

    from daemon.job_launchers import KubernetesJobLauncher
    from daemon.jobs.specs import DetectorSpec, DriftSpec, EvalSpec, PlanSpec

    settings = Settings(train_launcher="kubernetes")
    api = k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9"))  # never called: choosing calls no API
    on_device = [
        TrainSpec(parent_dir="/p", out_dir="/o", new_path="/n"),
        EvalSpec(round_id="r1", serving="/s", candidates=[], new_path="/n", replay_path="/r", out="/o"),
        DriftSpec(model="/s", new_path="/n", ref_path="/r", out="/o"),
        DetectorSpec(served="/s", reference="/b", docs_path="/d", out="/o"),
        DeviceCheckSpec(device="cuda", out="/o"),
    ]
    for spec in on_device:
        assert isinstance(launcher_for(settings, spec, api), KubernetesJobLauncher), type(spec).__name__
    assert [s.distributed for s in on_device] == [True, False, False, False, False]
    plan = PlanSpec(model_shape={}, out="/o")
    assert type(launcher_for(settings, plan, api)) is ProcessLauncher
    assert type(launcher_for(Settings(train_launcher="torchrun:8"), plan)) is ProcessLauncher


def test_cpu_threads_reach_every_job_not_only_the_trainer(tmp_path):
    """CPTD_TRAIN_CPU_THREADS=1 on a shared box: a job that is not the trainer (here the device check) gets it too."""
    for threads in (1, 2):  # torch caps the count at the cores it sees; one differs from its default on any multi-core box
        (tmp_path / str(threads)).mkdir()
        out = run_to_end(_job(tmp_path / str(threads)), launcher_for(Settings(train_cpu_threads=threads), _job(tmp_path).spec))
        assert out["cpu_threads"] == threads


def test_the_progress_follower_reads_complete_lines_once(tmp_path):
    path = tmp_path / "progress.jsonl"
    follow = JsonlFollower(path)
    assert follow.new() == []  # no file yet
    path.write_text('{"event": "start", "text": "é"}\n{"event": "st')
    assert follow.new() == [{"event": "start", "text": "é"}]  # the unfinished line waits
    with open(path, "a") as f:
        f.write('ep", "step": 1}\n')
    assert follow.new() == [{"event": "step", "step": 1}] and follow.new() == []


def test_a_failed_trainer_fails_the_round_naming_the_phase_code_and_cause(tmp_path, monkeypatch):
    from daemon.round_record import TrainRecord
    from daemon.rounds.training import training

    class Crashing(ProcessLauncher):
        def command(self, job: Job) -> list[str]:
            return ["sh", "-c", "echo 'RuntimeError: CUDA out of memory'; exit 3"]

    monkeypatch.setattr("daemon.rounds.context.launcher_for", lambda *a, **k: Crashing())
    store = CancelFlag()
    ctx = job_context(Settings(checkpoint_dir=tmp_path), store)
    rec = bare_record()
    (tmp_path / "rounds" / rec.id).mkdir(parents=True)
    spec = TrainSpec(parent_dir="/p", out_dir=str(tmp_path / "train"), new_path="/n", round_id=rec.id)
    rec.train = TrainRecord(spec=spec, spec_digest=spec.digest(), out_dir=spec.out_dir, launcher="subprocess")
    with pytest.raises(RoundFailed) as e:
        training(ctx, rec)
    assert e.value.cause.startswith("TRAINING: daemon.jobs.trainer exited with code 3:") and "CUDA out of memory" in e.value.cause
    assert (
        store.record is not None and store.record["train"]["spec"]["round_id"] == rec.id
    )  # the record was written, progress followed to the end


def test_a_child_sees_the_runtime_environment_but_no_daemon_setting_or_secret(tmp_path, monkeypatch):
    """A real child under a daemon environment holding the Redis URL, the API token and other secrets: it gets none."""
    secrets = {
        "CPTD_REDIS_URL": "rediss://cptd:hunter2@redis:6379/0",
        "CPTD_API_TOKEN": "api-token",
        "CPTD_KAFKA_SASL_PASSWORD": "sasl",
        "CPTD_REDIS_PASSWORD": "pw",
        "HF_TOKEN": "hf_xyz",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "NCCL_SOCKET_IFNAME_KEY": "k",
    }
    for k, v in {**secrets, "NCCL_DEBUG": "WARN", "LC_ALL": "C.UTF-8", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)

    class PrintsItsEnvironment(ProcessLauncher):
        def command(self, job: Job) -> list[str]:
            dump = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
            return [sys.executable, "-c", dump, str(job.spec.result_file)]

    seen = run_to_end(_job(tmp_path), PrintsItsEnvironment(cpu_threads=3))
    assert not set(secrets) & set(seen), sorted(set(secrets) & set(seen))
    assert not [k for k in seen if k.startswith("CPTD_")]
    assert seen["PATH"] == os.environ["PATH"] and seen["OMP_NUM_THREADS"] == "3" and seen["PYTHONUNBUFFERED"] == "1"
    assert seen["NCCL_DEBUG"] == "WARN" and seen["LC_ALL"] == "C.UTF-8" and seen["TOKENIZERS_PARALLELISM"] == "false"
    assert seen.get("PYTHONPATH") == os.environ.get("PYTHONPATH")  # the job imports the daemon's code as the daemon does
