"""One way to run a torch job: a launcher starts it, polls it, cancels or leaves it, and the result is one file.

Every job kind (trainer, evaluator, drift probe, generated-text detector,
device check) is `python -m MODULE SPEC.json` with a typed spec
(daemon/jobs/specs.py) that names its result file. Three launchers run them:

* `ProcessLauncher`: a child process of the daemon. It dies with the daemon
  (PR_SET_PDEATHSIG), so a restarted daemon never races a leftover job; the
  trainer resumes from its newest checkpoint instead.
* `TorchrunLauncher`: the same, under `torch.distributed.run` with N ranks.
* `KubernetesJobLauncher`: a Job from the operator's job template, named after
  the round and the job kind (connectors/kubernetes_jobs.py): the trainer's is an
  Indexed Job (or a Kubeflow TrainJob) over every node and GPU of the template,
  every other job's one pod running one process on one GPU. It outlives the
  daemon: a new lease holder re-attaches by name, and only a cancel deletes it.

Which one runs a job (`launcher_for`) follows its spec, not its caller: a job that
loads a model (`on_trainer_device`) runs where CPTD_TRAIN_LAUNCHER puts the
trainer, so on the multi-gpu overlay nothing that loads a model runs in the
daemon's pod (no GPU, 8 GiB); the memory plan (fake tensors) is a child process.

A job has succeeded when its launcher says it ended well *and* its result file
is there; the round reads that file and nothing else (no stdout, no log lines).
`JsonlFollower` is the one reader of a job's progress file as it grows.

A child process sees an allow-listed environment (`job_environment`): the
runtime's variables, never the daemon's settings or secrets.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from connectors.secret_names import SECRET_NAME
from daemon.jobs.specs import JobSpec
from daemon.settings import Settings

log = logging.getLogger("cptd.jobs")


@dataclass(frozen=True)
class Job:
    """One run of a job: its spec, where the spec file is written, where its output is logged."""

    spec: JobSpec
    spec_path: Path
    log_path: Path
    round_id: str = ""  # names the Kubernetes workload

    @property
    def module(self) -> str:
        return self.spec.module

    def result(self) -> Any:
        return json.loads(self.spec.result_file.read_text(encoding="utf-8"))

    def log_tail(self, lines: int = 5, chars: int = 800) -> str:
        if not self.log_path.exists():
            return ""
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])[-chars:].strip()


@dataclass(frozen=True)
class JobEnd:
    ok: bool
    cause: str = ""  # why it failed, naming the job: exit code and log tail, or the workload's and pods' causes


class Launcher(Protocol):
    name: str

    def start(self, job: Job) -> None:
        """Start the job, or re-attach to it when it already runs (the spec file is written first)."""

    def poll(self) -> JobEnd | None:
        """None while it runs; how it ended once it has."""

    def cancel(self) -> None:
        """Stop it for good (operator cancel, timeout): kill the process, delete the workload."""

    def detach(self) -> None:
        """The daemon stops or lost the lease: a child process is stopped (it resumes later), a workload runs on."""


# What a job may see of the daemon's environment. A job reads its spec file and the shared volume and talks to no
# service, so it needs the runtime's variables only: the daemon's own settings (CPTD_*: the Redis URL, the API token,
# Kafka's SASL credentials) and any other secret stay with the daemon. Allow-listed, not deny-listed, so a secret
# added to the daemon's pod later is not handed to jobs by default.
JOB_ENV_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH"}
    | {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "XDG_CACHE_HOME", "TOKENIZERS_PARALLELISM"}
)
JOB_ENV_PREFIXES = (
    "LC_",
    "PYTHON",  # PYTHONPATH, PYTHONHASHSEED, ...
    "OMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "TORCH",  # TORCH_HOME, TORCHINDUCTOR_*, TORCH_NCCL_*
    "PYTORCH_",  # PYTORCH_CUDA_ALLOC_CONF
    "CUDA_",
    "CUBLAS_",
    "CUDNN_",
    "NCCL_",
    "NVIDIA_",
    "GLOO_",
    "TRITON_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
)
# Even an allowed prefix never carries one of these (HF_TOKEN, NCCL_..._KEY): jobs load models from disk only.


def job_environment(parent: dict[str, str], cpu_threads: int = 0) -> dict[str, str]:
    """The environment of a job's child process: the allow-listed runtime variables of `parent`, nothing else."""
    env = {k: v for k, v in parent.items() if (k in JOB_ENV_NAMES or k.startswith(JOB_ENV_PREFIXES)) and not SECRET_NAME.search(k)}
    env["PYTHONUNBUFFERED"] = "1"
    if cpu_threads:
        # Every torch child, not only the trainer: on a small shared CPU box a second OpenMP thread waiting
        # for a busy core made the evaluator 7x slower (docs/round-engine.md, Training on a CPU).
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    return env


def _pdeathsig() -> None:
    """Child processes die with the daemon (Linux), so a restarted daemon never races a leftover job."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ProcessLauncher:
    """`python -m MODULE SPEC.json` as a child process, its output appended to the job's log."""

    name = "subprocess"

    def __init__(self, cpu_threads: int = 0) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.job: Job | None = None
        self.cpu_threads = cpu_threads  # OMP_NUM_THREADS of the child (0 = torch's default, one per core)

    def command(self, job: Job) -> list[str]:
        return [sys.executable, "-m", job.module, str(job.spec_path)]

    def start(self, job: Job) -> None:
        self.job = job
        job.spec.write(job.spec_path)
        with open(job.log_path, "ab") as out:
            env = job_environment(dict(os.environ), self.cpu_threads)
            self.proc = subprocess.Popen(self.command(job), stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_pdeathsig)

    def poll(self) -> JobEnd | None:
        assert self.job is not None
        if self.proc is None:  # stopped by another thread (the lease loop's stop_job) since the last poll
            return JobEnd(ok=False, cause=f"{self.job.module} was stopped")
        rc = self.proc.poll()
        if rc is None:
            return None
        self.proc = None
        if rc == 0 and self.job.spec.result_file.exists():
            return JobEnd(ok=True)
        what = f"exited with code {rc}" if rc != 0 else f"exited 0 without writing {self.job.spec.result_file}"
        return JobEnd(ok=False, cause=f"{self.job.module} {what}: {self.job.log_tail()}")

    def cancel(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    detach = cancel  # the trainer resumes from its last checkpoint on the next start


class TorchrunLauncher(ProcessLauncher):
    """N ranks on this machine under torch.distributed.run (DDP or FSDP2 with gloo or NCCL)."""

    def __init__(self, ranks: int, cpu_threads: int = 0):
        super().__init__(cpu_threads)
        self.ranks = ranks
        self.name = f"torchrun:{ranks}"

    def command(self, job: Job) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.ranks}", "-m", job.module, str(job.spec_path)]


class KubernetesJobLauncher:
    """The round's Kubernetes workload: created or re-attached by name, polled every `train_poll_s`.

    The result file is on the volume the daemon and the workload share. An API hiccup is not a failed job;
    five minutes of them are. A workload that completed without its result file fails after a minute (a shared
    volume may show the file a little later than the API shows the Job complete)."""

    name = "kubernetes"
    api_grace_s = 300.0
    result_grace_s = 60.0

    def __init__(self, settings: Settings, api_client: Any = None):
        from connectors.kubernetes_jobs import KubernetesLauncher

        self.settings = settings
        self.workloads = KubernetesLauncher(api_client)
        self.workload: Any = None  # connectors.kubernetes_jobs.WorkloadSpec
        self.job: Job | None = None
        self.last_poll = self.api_ok = 0.0
        self.done_at: float | None = None

    def start(self, job: Job) -> None:
        from connectors.kubernetes_jobs import KubernetesLaunchError, WorkloadSpec, current_namespace, template_shape

        if not job.round_id:
            raise JobStartError(f"{job.module}: a Kubernetes workload is named after its round, and this job names none")
        self.job = job
        job.spec.write(job.spec_path)
        s = self.settings
        namespace = s.train_namespace or current_namespace()
        digest = job.spec.digest()
        distributed = job.spec.distributed
        try:
            template = self.workloads.load_template(s.train_job_template, namespace)
            # The trainer: every node and GPU of the template, as a Job or a TrainJob. Any other job: one process on
            # one GPU of the same pod template, as a plain Job whatever train_workload says (no rendezvous to make).
            nodes, gpus = template_shape(template) if distributed else (1, 1)
            self.workload = WorkloadSpec(
                job.round_id,
                1,
                namespace,
                str(job.spec_path),
                digest,
                template,
                s.train_workload if distributed else "job",
                nodes,
                gpus,
                s.train_runtime,
                module=job.module,
                role=job.spec.role,
                distributed=distributed,
            )
            created = self.workloads.ensure(self.workload)
        except KubernetesLaunchError as e:
            raise JobStartError(str(e)) from e
        self.api_ok = time.monotonic()
        log.info("workload " + ("created" if created else "re-attached"), extra={"round_id": job.round_id, "workload": self.workload.name})

    def poll(self) -> JobEnd | None:
        assert self.job is not None and self.workload is not None
        now = time.monotonic()
        if now - self.last_poll < self.settings.train_poll_s:
            return None
        self.last_poll = now
        w = self.workload
        try:
            status = self.workloads.status(w)
            self.api_ok = now
        except Exception as e:  # noqa: BLE001 - any API error: retried until the grace runs out
            if now - self.api_ok > self.api_grace_s:
                return JobEnd(False, f"{w.kind} {w.name}: Kubernetes API unreachable for {self.api_grace_s:.0f} s: {e}")
            log.warning("workload status not readable", extra={"workload": w.name, "error": str(e)})
            return None
        if status.phase == "failed":
            self.workloads.delete_service(w)  # the Job stays for `kubectl logs` until its TTL
            return JobEnd(False, f"{w.kind} {w.name} failed: {status.failure()}")
        if status.phase == "missing":
            return JobEnd(False, f"{w.kind} {w.name} disappeared before it completed (deleted by hand or by its TTL)")
        if status.phase == "succeeded":
            if self.job.spec.result_file.exists():
                self.workloads.delete(w)
                return JobEnd(ok=True)
            self.done_at = self.done_at or now
            if now - self.done_at > self.result_grace_s:
                return JobEnd(False, f"{w.kind} {w.name} completed but {self.job.spec.result_file} is missing")
        return None

    def cancel(self) -> None:
        if self.workload is not None:
            self.workloads.delete(self.workload)

    def detach(self) -> None:
        """Left running: the next lease holder re-attaches by name."""


class JobStartError(RuntimeError):
    """The launcher could not start the job (a Kubernetes template missing, the API refusing the object)."""


def launcher_for(settings: Settings, spec: JobSpec, api_client: Any = None) -> Launcher:
    """A job that loads a model (`spec.on_trainer_device`) runs where CPTD_TRAIN_LAUNCHER puts the trainer: the trainer
    on all its ranks, any other job as one process (torchrun:N: a child process on that machine; kubernetes: a one-GPU
    Job from the trainer's template). A job that needs no device (the memory plan) is a child process of the daemon."""
    kind = settings.train_launcher if spec.on_trainer_device else "subprocess"
    if kind.startswith("torchrun:") and not spec.distributed:
        kind = "subprocess"
    if kind in ("subprocess", "process"):
        return ProcessLauncher(settings.train_cpu_threads)
    if kind.startswith("torchrun:"):
        return TorchrunLauncher(int(kind.split(":", 1)[1]), settings.train_cpu_threads)
    if kind == "kubernetes":
        return KubernetesJobLauncher(settings, api_client)
    raise JobStartError(f"launcher {kind!r} is not supported by this version (use subprocess, torchrun:N or kubernetes)")


def train_ranks(settings: Settings, api_client: Any = None) -> tuple[int, int]:
    """(ranks in all, nodes) a round's trainer runs on: what the memory plan at PENDING plans for. Kubernetes: the
    job template's nodes x GPUs per node, read as the launcher reads it (JobStartError when it cannot be read)."""
    kind = settings.train_launcher
    if kind.startswith("torchrun:"):
        return int(kind.split(":", 1)[1]), 1
    if kind == "kubernetes":
        from connectors.kubernetes_jobs import KubernetesLauncher, KubernetesLaunchError, current_namespace, template_shape

        try:
            namespace = settings.train_namespace or current_namespace()
            template = KubernetesLauncher(api_client).load_template(settings.train_job_template, namespace)
            nodes, per_node = template_shape(template)
        except KubernetesLaunchError as e:
            raise JobStartError(str(e)) from e
        return nodes * per_node, nodes
    return 1, 1


class JobFailed(RuntimeError):
    """A job ended without its result: the launcher's cause (exit code and log tail, or the workload's)."""


def run_to_end(job: Job, launcher: Launcher | None = None, poll_s: float = 0.5) -> Any:
    """A job run in the foreground (the CLI's commands): no lease, no cancel; its result, or JobFailed."""
    launcher = launcher or ProcessLauncher()
    launcher.start(job)
    try:
        while (end := launcher.poll()) is None:
            time.sleep(poll_s)  # a poll interval: the job's end is what is waited for
    except BaseException:
        launcher.cancel()
        raise
    if not end.ok:
        raise JobFailed(end.cause)
    return job.result()


class JsonlFollower:
    """Reads the complete lines a job has appended to a JSONL file since the last call (progress files)."""

    def __init__(self, path: Path):
        self.path, self.pos = path, 0

    def new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read()
        lines = chunk.split(b"\n")
        self.pos += len(chunk) - len(lines[-1])  # an unfinished last line is read again next time
        out = []
        for line in lines[:-1]:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
