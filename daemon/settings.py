"""Where things are and the secrets to reach them: from the environment, never from the policy file.

The policy file steers behaviour and is safe to show; connection strings may
carry passwords and tokens are secrets, so they come from env or mounted files
(Kubernetes Secrets) and are never logged.
"""

from __future__ import annotations

import importlib.util
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from connectors.kafka import KafkaConnection
    from policies.config import Policy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CPTD_", extra="ignore")

    policy: Path = Field(default=Path("/etc/cptd/policy.yaml"), description="policy file path (CPTD_POLICY)")
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"), description="CPTD_REDIS_URL; rediss:// for TLS, userinfo for an ACL user"
    )
    redis_username: str | None = Field(default=None, description="CPTD_REDIS_USERNAME; ACL user when the URL has no userinfo")
    redis_password: SecretStr | None = Field(default=None, description="CPTD_REDIS_PASSWORD")
    redis_password_file: Path | None = Field(default=None, description="CPTD_REDIS_PASSWORD_FILE; read at every connect")
    redis_ca_file: Path | None = Field(default=None, description="CPTD_REDIS_CA_FILE; CA bundle for rediss:// (default: system CAs)")
    redis_cert_file: Path | None = Field(default=None, description="CPTD_REDIS_CERT_FILE; client certificate (mTLS)")
    redis_key_file: Path | None = Field(default=None, description="CPTD_REDIS_KEY_FILE; its key")
    redis_check_hostname: bool = Field(default=True, description="CPTD_REDIS_CHECK_HOSTNAME")
    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="CPTD_KAFKA_BOOTSTRAP")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="CPTD_KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        default=None, description="CPTD_KAFKA_SASL_MECHANISM"
    )
    kafka_sasl_username: str | None = Field(default=None, description="CPTD_KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="CPTD_KAFKA_SASL_PASSWORD")
    kafka_sasl_password_file: Path | None = Field(default=None, description="CPTD_KAFKA_SASL_PASSWORD_FILE; a mounted Secret")
    kafka_sasl_oauth_token_file: Path | None = Field(
        default=None, description="CPTD_KAFKA_SASL_OAUTH_TOKEN_FILE; OAUTHBEARER token, re-read when the file changes"
    )
    kafka_ca_file: Path | None = Field(default=None, description="CPTD_KAFKA_CA_FILE; CA bundle (default: system CAs)")
    kafka_cert_file: Path | None = Field(default=None, description="CPTD_KAFKA_CERT_FILE; client certificate (mTLS)")
    kafka_key_file: Path | None = Field(default=None, description="CPTD_KAFKA_KEY_FILE; its key")
    kafka_key_password: SecretStr | None = Field(default=None, description="CPTD_KAFKA_KEY_PASSWORD; when the key is encrypted")
    kafka_check_hostname: bool = Field(default=True, description="CPTD_KAFKA_CHECK_HOSTNAME")
    kafka_retry_max_s: float = Field(default=30.0, gt=0, description="CPTD_KAFKA_RETRY_MAX_S; backoff cap while Kafka refuses us")
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    api_token: SecretStr | None = Field(default=None, description="CPTD_API_TOKEN; bearer token for mutating routes")
    api_token_file: Path | None = Field(default=None, description="CPTD_API_TOKEN_FILE; a mounted Secret")
    log_level: str = "INFO"
    # --- rounds and serving ---
    checkpoint_dir: Path = Field(
        default=Path("/checkpoints"),
        description="CPTD_CHECKPOINT_DIR; round data and checkpoints, on a volume vLLM also mounts (CPTD_CHECKPOINT_URL: scratch)",
    )
    base_checkpoint: Path | None = Field(
        default=None, description="CPTD_BASE_CHECKPOINT; what vLLM booted with (default CHECKPOINT_DIR/base)"
    )
    checkpoint_url: str | None = Field(
        default=None,
        description="CPTD_CHECKPOINT_URL; s3://bucket/prefix: the base (PREFIX/base), deployed candidates and main lines "
        "(PREFIX/rounds/ID/...) on S3 or an S3-compatible store, which vLLM streams from; CHECKPOINT_DIR is then local "
        "scratch. Endpoint and credentials: the AWS_* variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...)",
    )
    vllm_urls: str = Field(default="", description="CPTD_VLLM_URLS; comma-separated replica URLs")
    vllm_control_url: str | None = Field(
        default=None,
        description="CPTD_VLLM_CONTROL_URL; a headless Service URL, resolved again and again to one URL per replica address",
    )
    vllm_urls_file: Path | None = Field(
        default=None,
        description="CPTD_VLLM_URLS_FILE; a file of replica URLs (one per line, # comments), read again every "
        "CPTD_VLLM_DISCOVERY_S: replicas outside Kubernetes, kept current by whatever starts them",
    )
    vllm_discovery_s: float = Field(
        default=10.0,
        gt=0,
        description="CPTD_VLLM_DISCOVERY_S; seconds between resolutions of the control URL (or reads of the URLs file) "
        "and replica health reads",
    )
    vllm_api_key: SecretStr | None = Field(default=None, description="CPTD_VLLM_API_KEY; vLLM's --api-key")
    vllm_ca_file: Path | None = Field(default=None, description="CPTD_VLLM_CA_FILE; CA bundle for https replica URLs")
    train_launcher: str = Field(default="subprocess", description="CPTD_TRAIN_LAUNCHER: subprocess | torchrun:N | kubernetes")
    # --- CPTD_TRAIN_LAUNCHER=kubernetes (docs/kubernetes.md, connectors/kubernetes_jobs.py) ---
    train_workload: Literal["job", "trainjob"] = Field(
        default="job", description="CPTD_TRAIN_WORKLOAD: job (an Indexed Job + headless Service) | trainjob (Kubeflow Trainer TrainJob)"
    )
    train_namespace: str | None = Field(default=None, description="CPTD_TRAIN_NAMESPACE; default: the daemon's own (POD_NAMESPACE)")
    train_job_template: str = Field(
        default="cptd-train-template", description="CPTD_TRAIN_JOB_TEMPLATE; the suspended CronJob whose jobTemplate the workloads copy"
    )
    train_runtime: str = Field(default="torch-distributed", description="CPTD_TRAIN_RUNTIME; the TrainJob's runtimeRef (trainjob only)")
    train_poll_s: float = Field(default=5.0, gt=0, description="CPTD_TRAIN_POLL_S; seconds between workload status reads")
    train_cpu_threads: int = Field(default=0, description="CPTD_TRAIN_CPU_THREADS; OMP threads of every local job (0 = torch default)")
    round_webhook_url: SecretStr | None = Field(
        default=None, description="CPTD_ROUND_WEBHOOK_URL; POSTed a small JSON when a round ends (daemon/round_webhook.py)"
    )
    # --- experiment tracking (daemon/round_tracking.py): off unless a tracking URI is set ---
    mlflow_tracking_uri: SecretStr | None = Field(
        default=None,
        description="CPTD_MLFLOW_TRACKING_URI; an MLflow tracking server, http(s)://[user:password@]host[:port][/path]: each "
        "ended round becomes a run there and its candidate a registered model version (unset: no tracking)",
    )
    mlflow_tracking_token: SecretStr | None = Field(default=None, description="CPTD_MLFLOW_TRACKING_TOKEN; bearer token for the server")
    mlflow_experiment: str = Field(default="cptd", min_length=1, description="CPTD_MLFLOW_EXPERIMENT; the experiment rounds go to")
    mlflow_model_name: str | None = Field(
        default=None, description="CPTD_MLFLOW_MODEL_NAME; the registered model candidates become versions of (default: the policy's name)"
    )
    mlflow_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="CPTD_MLFLOW_TIMEOUT_S; the bound on each request to the tracking server"
    )
    # --- what the trainer's hardware holds: the memory plan checks a round against it at PENDING (docs/round-engine.md) ---
    train_gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="CPTD_TRAIN_GPU_MEMORY_GB; GiB of memory on each GPU a round trains on (unset: no plan at PENDING)"
    )
    train_host_memory_gb: float | None = Field(
        default=None, gt=0, description="CPTD_TRAIN_HOST_MEMORY_GB; GiB of host memory per training node (checked only with the GPU figure)"
    )
    pod_name: str | None = Field(default=None, validation_alias="POD_NAME", description="POD_NAME; names this daemon as lease holder")

    @model_validator(mode="after")
    def _train_launcher_supported(self) -> Settings:
        ok = self.train_launcher in ("subprocess", "process", "kubernetes") or (
            self.train_launcher.startswith("torchrun:") and self.train_launcher[9:].isdigit() and int(self.train_launcher[9:]) > 0
        )
        if not ok:
            raise ValueError(f"CPTD_TRAIN_LAUNCHER={self.train_launcher!r} is not supported: use subprocess, torchrun:N or kubernetes")
        return self

    @model_validator(mode="after")
    def _checkpoint_url_supported(self) -> Settings:
        if self.checkpoint_url is None:
            return self
        from connectors.object_store import split_url

        split_url(self.checkpoint_url)  # an s3:// URL naming a bucket, or refused at start
        if importlib.util.find_spec("boto3") is None:
            raise ValueError("CPTD_CHECKPOINT_URL needs boto3, which is not installed here: pip install 'cptd[s3]'")
        if self.base_checkpoint is not None:
            raise ValueError("CPTD_BASE_CHECKPOINT with CPTD_CHECKPOINT_URL: the base is CHECKPOINT_URL/base; unset one of them")
        if self.train_launcher == "kubernetes":
            raise ValueError(
                "CPTD_CHECKPOINT_URL with CPTD_TRAIN_LAUNCHER=kubernetes is not supported yet: the daemon stages checkpoints "
                "in its own scratch, which a training pod does not see; use subprocess or torchrun:N"
            )
        return self

    @model_validator(mode="after")
    def _kafka_settings_fit_together(self) -> Settings:
        self.kafka()  # a SASL protocol without a mechanism or credentials, a cert without its key: refused at start, named
        return self

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _mlflow_uri_is_http(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:  # refused at start, named; the export thread never meets a bad one
            from connectors.mlflow_rest import MlflowClient

            MlflowClient(v.get_secret_value()).close()
        return v

    def base_checkpoint_path(self) -> Path:
        return self.base_checkpoint or self.checkpoint_dir / "base"

    def base_checkpoint_ref(self) -> str:
        """What vLLM booted with, as the serving state names it: CHECKPOINT_URL/base on object storage, else a path."""
        if self.checkpoint_url is not None:
            return self.checkpoint_url.rstrip("/") + "/base"
        return str(self.base_checkpoint_path().resolve())

    def local_ranks(self) -> int | None:
        """Ranks a round trains on where the settings alone say it (subprocess: 1, torchrun:N: N); None for kubernetes,
        whose job template says it (PENDING reads it)."""
        if self.train_launcher in ("subprocess", "process"):
            return 1
        return int(self.train_launcher[9:]) if self.train_launcher.startswith("torchrun:") else None

    def policy_refusal(self, policy: Policy) -> str | None:
        """What in a valid policy this deployment cannot run: refused when the policy loads (at start and on every
        reload, the old one staying in force), not when a round has already taken documents."""
        if policy.train.cpu_offload and self.local_ranks() == 1:
            return (
                f"train.cpu_offload: offloading is FSDP's, and CPTD_TRAIN_LAUNCHER={self.train_launcher} trains on one rank, "
                "which is not sharded; use torchrun:N or kubernetes with several GPUs, or drop cpu_offload"
            )
        if self.checkpoint_url is not None and policy.train.mode != "full":
            return (
                f"train.mode {policy.train.mode} with CPTD_CHECKPOINT_URL: adapters are loaded by vLLM from a local path, "
                "and checkpoints on object storage support full-weight rounds only; use train.mode full or a volume"
            )
        if self.checkpoint_url is not None and policy.collapse.detector:
            return (
                "collapse.detector with CPTD_CHECKPOINT_URL: the detector job loads the served model and the base from local "
                "paths, which are not staged from object storage yet; turn the detector off or use a volume"
            )
        from policies.round_policy import is_harness_task

        harness = sorted(n for n, path in policy.rounds.suites.items() if is_harness_task(path))
        if harness and importlib.util.find_spec("lm_eval") is None:
            return (
                f"rounds.suites {harness}: lm-eval task YAMLs are scored by lm-eval, which is not installed here "
                "(pip install 'cptd[harness]', or an image built with EXTRAS=train,launcher,harness)"
            )
        return None

    def kafka(self) -> KafkaConnection:
        """The Kafka connection every client is built from (connectors.kafka.kafka_client_config)."""
        from connectors.kafka import KafkaConnection

        return KafkaConnection(
            bootstrap=self.kafka_bootstrap,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password,
            sasl_password_file=self.kafka_sasl_password_file,
            sasl_oauth_token_file=self.kafka_sasl_oauth_token_file,
            ssl_cafile=self.kafka_ca_file,
            ssl_certfile=self.kafka_cert_file,
            ssl_keyfile=self.kafka_key_file,
            ssl_key_password=self.kafka_key_password,
            ssl_check_hostname=self.kafka_check_hostname,
        )

    def redis_options(self) -> dict[str, Any]:
        """Keyword arguments of connectors.redis_store.connect besides the URL (TLS files, ACL user)."""
        return {
            "username": self.redis_username,
            "password": self.redis_password.get_secret_value() if self.redis_password else None,
            "password_file": self.redis_password_file,
            "ssl_ca_file": self.redis_ca_file,
            "ssl_cert_file": self.redis_cert_file,
            "ssl_key_file": self.redis_key_file,
            "ssl_check_hostname": self.redis_check_hostname,
        }

    def vllm_verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify=` for replica URLs: a context trusting the CA bundle file, else the system CAs."""
        return ssl.create_default_context(cafile=str(self.vllm_ca_file)) if self.vllm_ca_file else True

    def token(self) -> str | None:
        """The API's bearer token, read from CPTD_API_TOKEN_FILE at every call: a rotated Secret takes effect at once
        (the kubelet swaps the mounted file), for the daemon as for the CLI, which reads the same file."""
        if self.api_token_file is not None:
            return self.api_token_file.read_text().strip() or None
        return self.api_token.get_secret_value() if self.api_token else None
