"""S3 objects and plain http(s) URLs for the loader, on warmstart.storage's one client.

`storage_config` turns the loader's options into the storage layer's `StorageConfig` (the
environment is read there, in `StorageConfig.from_env`); the sources themselves are
`warmstart.storage.s3.S3Object` and `HttpObject`.
"""

from __future__ import annotations

from concurrent.futures import Executor

from warmstart.loader.config import LoaderConfig
from warmstart.storage.config import StorageConfig
from warmstart.storage.errors import map_client_error
from warmstart.storage.retry import RetryPolicy
from warmstart.storage.s3 import HttpObject, HttpTransport, S3Client, S3Object
from warmstart.storage.uri import S3Uri

__all__ = ["storage_config", "open_client", "HttpObject", "HttpTransport", "S3Client",
           "S3Object", "S3Uri", "map_client_error"]


def storage_config(config: LoaderConfig) -> StorageConfig:
    return StorageConfig.from_env(
        endpoint_url=config.s3_endpoint_url, region=config.s3_region,
        addressing_style=None if config.s3_addressing_style == "auto"
        else config.s3_addressing_style,
        data_path=None if config.s3_data_path == "auto" else config.s3_data_path,
        connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
        max_connections=config.read_concurrency("s3"),
        retry=RetryPolicy(config.max_attempts, config.retry_base_delay,
                          config.retry_max_delay))


def open_client(config: LoaderConfig, executor: Executor) -> S3Client:
    return S3Client(storage_config(config), executor)
