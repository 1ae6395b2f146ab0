"""Where things are and the secrets to reach them: from the environment, never from the policy file.

The policy file steers behaviour and is safe to show; connection strings may
carry passwords and tokens are secrets, so they come from env or mounted files
(Kubernetes Secrets) and are never logged.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CPTD_", extra="ignore")

    policy: Path = Field(default=Path("/etc/cptd/policy.yaml"), description="policy file path (CPTD_POLICY)")
    redis_url: SecretStr = Field(default=SecretStr("redis://127.0.0.1:6379/0"), description="CPTD_REDIS_URL")
    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="CPTD_KAFKA_BOOTSTRAP")
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    api_token: SecretStr | None = Field(default=None, description="CPTD_API_TOKEN; bearer token for mutating routes")
    api_token_file: Path | None = Field(default=None, description="CPTD_API_TOKEN_FILE; a mounted Secret")
    log_level: str = "INFO"
    # --- rounds and serving ---
    checkpoint_dir: Path = Field(
        default=Path("/checkpoints"), description="CPTD_CHECKPOINT_DIR; round data and checkpoints, on a volume vLLM also mounts"
    )
    base_checkpoint: Path | None = Field(
        default=None, description="CPTD_BASE_CHECKPOINT; what vLLM booted with (default CHECKPOINT_DIR/base)"
    )
    vllm_urls: str = Field(default="", description="CPTD_VLLM_URLS; comma-separated replica URLs")
    vllm_control_url: str | None = Field(
        default=None, description="CPTD_VLLM_CONTROL_URL; a headless Service URL, resolved to one URL per replica address"
    )
    vllm_api_key: SecretStr | None = Field(default=None, description="CPTD_VLLM_API_KEY; vLLM's --api-key")
    train_launcher: str = Field(default="subprocess", description="CPTD_TRAIN_LAUNCHER: subprocess | torchrun:N (kubernetes-job: not yet)")
    train_cpu_threads: int = Field(default=0, description="CPTD_TRAIN_CPU_THREADS; torch threads of a CPU trainer (0 = torch default)")
    pod_name: str | None = Field(default=None, validation_alias="POD_NAME", description="POD_NAME; names this daemon as lease holder")

    def base_checkpoint_path(self) -> Path:
        return self.base_checkpoint or self.checkpoint_dir / "base"

    def replica_urls(self) -> list[str]:
        """Explicit URLs, else one per address the control Service resolves to (a headless Service lists every pod)."""
        urls = [u.strip().rstrip("/") for u in self.vllm_urls.split(",") if u.strip()]
        if urls or not self.vllm_control_url:
            return urls
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(self.vllm_control_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        addrs = sorted({a[4][0] for a in socket.getaddrinfo(u.hostname, port, proto=socket.IPPROTO_TCP)})
        return [f"{u.scheme}://{f'[{a}]' if ':' in a else a}:{port}" for a in addrs]

    def token(self) -> str | None:
        if self.api_token_file is not None:
            return self.api_token_file.read_text().strip() or None
        return self.api_token.get_secret_value() if self.api_token else None
