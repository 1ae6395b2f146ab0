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

    def token(self) -> str | None:
        if self.api_token_file is not None:
            return self.api_token_file.read_text().strip() or None
        return self.api_token.get_secret_value() if self.api_token else None
