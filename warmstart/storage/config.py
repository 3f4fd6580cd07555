"""Object-storage settings, and the one table of environment variables they are read from.

`StorageConfig.from_env()` is the only place any part of warmstart reads these variables;
everything else is handed a `StorageConfig` (docs/CONFIG.md lists the same table).

| variable | meaning |
|---|---|
| AWS_ENDPOINT_URL_S3 | S3 endpoint; wins over AWS_ENDPOINT_URL, as the AWS SDKs document |
| AWS_ENDPOINT_URL | endpoint for every AWS service, S3 included |
| AWS_REGION, AWS_DEFAULT_REGION | region (first set wins); us-east-1 with a custom endpoint |
| AWS_CA_BUNDLE | PEM file of the CAs that sign the endpoint's certificate (https) |
| AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, ... | read by the AWS credential chain (aiobotocore), never by warmstart |
| WARMSTART_S3_ADDRESSING_STYLE | path, virtual or auto (path style when a custom endpoint is set) |
| WARMSTART_S3_DATA_PATH | raw (ranged GETs into the buffer, http and https) or botocore |
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from warmstart.errors import ConfigError
from warmstart.storage.retry import RetryPolicy

ENV_TABLE = (
    ("AWS_ENDPOINT_URL_S3", "endpoint_url"),
    ("AWS_ENDPOINT_URL", "endpoint_url"),
    ("AWS_REGION", "region"),
    ("AWS_DEFAULT_REGION", "region"),
    ("AWS_CA_BUNDLE", "ca_bundle"),
    ("WARMSTART_S3_ADDRESSING_STYLE", "addressing_style"),
    ("WARMSTART_S3_DATA_PATH", "data_path"),
)
"""(variable, field) in precedence order: the first variable set for a field wins."""


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    """'path', 'virtual' or 'auto' (path style when a custom endpoint is set)."""
    data_path: str = "raw"
    """'raw': signed ranged GETs received straight into the buffer (http and https);
    'botocore': aiobotocore's streaming body (one more copy)."""
    ca_bundle: str | None = None
    verify_tls: bool = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_connections: int = 64
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    access_key: str | None = None
    """Explicit credentials (tests, tools); None leaves them to the AWS credential chain."""
    secret_key: str | None = None
    session_token: str | None = None

    def __post_init__(self) -> None:
        if self.addressing_style not in {"auto", "path", "virtual"}:
            raise ConfigError(f"s3 addressing style must be 'auto', 'path' or 'virtual', got "
                              f"{self.addressing_style!r}")
        if self.data_path == "auto":  # older configs: every endpoint now takes the raw path
            object.__setattr__(self, "data_path", "raw")
        if self.data_path not in {"raw", "botocore"}:
            raise ConfigError(f"s3 data path must be 'raw' or 'botocore', got "
                              f"{self.data_path!r}")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"S3 endpoint must be an http:// or https:// URL, got "
                              f"{self.endpoint_url!r}")
        for key in ("connect_timeout", "read_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be >= 1")

    @property
    def style(self) -> str:
        if self.addressing_style != "auto":
            return self.addressing_style
        return "path" if self.endpoint_url else "auto"

    @property
    def region_name(self) -> str | None:
        return self.region or ("us-east-1" if self.endpoint_url else None)

    def replace(self, **changes: Any) -> "StorageConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> "StorageConfig":
        """Reads ENV_TABLE; `overrides` that are not None win over the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for variable, key in ENV_TABLE:
            if key not in values and environ.get(variable):
                values[key] = environ[variable]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
