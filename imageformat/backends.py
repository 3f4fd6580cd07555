"""Key-value backends an image store lives on: a local folder or an S3 bucket prefix.

Both speak the same small async interface (`get`, `get_range`, `put`, `exists`, `list`,
`delete`); `open_backend` picks one by URI (`/path`, `file://path`, `s3://bucket/prefix`).
S3 errors are mapped onto the project's exception tree; transient ones are retried.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass

from warmstart.errors import (AccessDenied, ConfigError, EndpointUnreachable, NotFound,
                              Retryable, RetriesExhausted, SourceError)


class LocalBackend:
    """Keys are relative paths under `root`; writes are atomic (temp file + rename)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.uri = self.root

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ConfigError(f"bad store key {key!r}")
        return os.path.join(self.root, key)

    def _get_range(self, key: str, offset: int, length: int | None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise NotFound(f"{self.root}: no object {key}") from None

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._get_range, key, 0, None)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = await asyncio.to_thread(self._get_range, key, offset, length)
        if len(data) != length:
            raise SourceError(f"{self.root}/{key}: short read at {offset} ({len(data)} of "
                              f"{length} bytes)")
        return data

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    async def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        out = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.startswith(".tmp-"):
                    out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)

    async def list(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    async def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class S3Config:
    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"
    attempts: int = 4

    @classmethod
    def from_env(cls, env: dict | None = None) -> "S3Config":
        env = os.environ if env is None else env
        return cls(env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3"),
                   env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"),
                   env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1")


def _map_error(exc: Exception, what: str) -> Exception:
    import botocore.exceptions as bex
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
            return NotFound(msg)
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch"):
            return AccessDenied(msg)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
            return Retryable(msg)
        return SourceError(msg)
    if isinstance(exc, bex.EndpointConnectionError):
        return EndpointUnreachable(f"{what}: {exc}")
    if isinstance(exc, (bex.ConnectionClosedError, bex.ReadTimeoutError, asyncio.TimeoutError,
                        ConnectionError, bex.ResponseStreamingError, bex.IncompleteReadError)):
        return Retryable(f"{what}: {exc}")
    try:  # a body cut short or reset mid-way reaches us as aiohttp's own error
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return Retryable(f"{what}: {exc}")
    except ImportError:  # pragma: no cover - aiobotocore always brings aiohttp
        pass
    return SourceError(f"{what}: {exc}")


class S3Backend:
    """Keys live under `s3://bucket/prefix/`; path-style addressing for local servers."""

    def __init__(self, bucket: str, prefix: str, config: S3Config) -> None:
        self.bucket, self.prefix, self.config = bucket, prefix.strip("/"), config
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._client = None
        self._cm = None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _c(self):
        if self._client is None:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
            cfg = AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                            max_pool_connections=32, connect_timeout=10, read_timeout=60)
            self._cm = get_session().create_client(
                "s3", endpoint_url=self.config.endpoint, region_name=self.config.region,
                aws_access_key_id=self.config.access_key,
                aws_secret_access_key=self.config.secret_key, config=cfg)
            self._client = await self._cm.__aenter__()
        return self._client

    async def _call(self, what: str, fn):
        delay = 0.1
        for attempt in range(self.config.attempts):
            try:
                return await fn(await self._c())
            except Exception as exc:  # noqa: BLE001 - mapped right here
                mapped = _map_error(exc, f"{self.uri} {what}")
                if not isinstance(mapped, Retryable):
                    raise mapped from exc
                if attempt == self.config.attempts - 1:
                    raise RetriesExhausted(str(mapped)) from exc
                await asyncio.sleep(delay)
                delay *= 2

    async def get(self, key: str) -> bytes:
        async def go(c):
            resp = await c.get_object(Bucket=self.bucket, Key=self._key(key))
            async with resp["Body"] as body:
                return await body.read()
        return await self._call(f"GET {key}", go)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        async def go(c):
            resp = await c.get_object(Bucket=self.bucket, Key=self._key(key),
                                      Range=f"bytes={offset}-{offset + length - 1}")
            async with resp["Body"] as body:
                data = await body.read()
            if len(data) != length:
                raise ConnectionError(f"short body {len(data)} of {length}")
            return data
        return await self._call(f"GET {key} [{offset}, +{length})", go)

    async def put(self, key: str, data: bytes) -> None:
        async def go(c):
            await c.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        await self._call(f"PUT {key}", go)

    async def exists(self, key: str) -> bool:
        try:
            await self._call(f"HEAD {key}", lambda c: c.head_object(Bucket=self.bucket,
                                                                    Key=self._key(key)))
            return True
        except NotFound:
            return False

    async def list(self, prefix: str) -> list[str]:
        async def go(c):
            out, strip = [], len(self.prefix) + 1 if self.prefix else 0
            pages = c.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix))
            async for page in pages:
                out.extend(o["Key"][strip:] for o in page.get("Contents", []))
            return sorted(out)
        return await self._call(f"LIST {prefix}", go)

    async def delete(self, key: str) -> None:
        await self._call(f"DELETE {key}", lambda c: c.delete_object(Bucket=self.bucket,
                                                                    Key=self._key(key)))

    async def close(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._client = self._cm, None, None
            await cm.__aexit__(None, None, None)


class ThrottledBackend:
    """Wraps a backend to act like a slower network: one shared token bucket of
    `bytes_per_s` for every read, plus `latency` seconds per request. For benchmarks and
    tests; writes, listings and deletes pass through unthrottled."""

    def __init__(self, inner, bytes_per_s: float, latency: float = 0.0) -> None:
        if bytes_per_s <= 0:
            raise ConfigError("throttle rate must be positive")
        self.inner, self.rate, self.latency = inner, bytes_per_s, latency
        self.uri = inner.uri
        self._next_free = 0.0

    async def _pay(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        start = max(loop.time(), self._next_free)
        self._next_free = start + n / self.rate
        await asyncio.sleep(max(self._next_free - loop.time(), 0) + self.latency)

    async def get(self, key: str) -> bytes:
        data = await self.inner.get(key)
        await self._pay(len(data))
        return data

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = await self.inner.get_range(key, offset, length)
        await self._pay(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def open_backend(uri: str, s3: S3Config | None = None):
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise ConfigError(f"{uri}: no bucket")
        return S3Backend(bucket, prefix, s3 or S3Config.from_env())
    if uri.startswith("file://"):
        uri = uri[7:]
    if "://" in uri:
        raise ConfigError(f"{uri}: unsupported store scheme (use a path or s3://)")
    return LocalBackend(uri)
