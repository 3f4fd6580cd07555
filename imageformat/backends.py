"""Key-value backends an image store lives on: a local folder or an S3 bucket prefix.

Both speak the same small async interface (`get`, `get_range`, `put`, `exists`, `list`,
`delete`); `open_backend` picks one by URI (`/path`, `file://path`, `s3://bucket/prefix`).
S3 goes through warmstart.storage's one client: its error table and its retry policy.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

from warmstart.errors import ConfigError, NotFound, SourceError
from warmstart.storage.config import StorageConfig
from warmstart.storage.s3 import S3Client
from warmstart.storage.uri import S3Uri, parse_s3


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


def S3Config(endpoint: str | None = None, access_key: str | None = None,
             secret_key: str | None = None, region: str | None = None) -> StorageConfig:
    """Storage settings for an image store on S3: the environment (one table, in
    `StorageConfig.from_env`) with the given values on top."""
    return StorageConfig.from_env(endpoint_url=endpoint, access_key=access_key,
                                  secret_key=secret_key, region=region)


S3Config.from_env = StorageConfig.from_env  # type: ignore[attr-defined]


class S3Backend:
    """Keys live under `s3://bucket/prefix/`, through the one storage client (its error
    table, its retry policy, ranged GETs into the buffer, multipart PUTs)."""

    def __init__(self, bucket: str, prefix: str, config: StorageConfig) -> None:
        self.bucket, self.prefix, self.config = bucket, prefix.strip("/"), config
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._client: S3Client | None = None
        self._opening = None

    def _obj(self, key: str) -> S3Uri:
        return S3Uri(self.bucket, f"{self.prefix}/{key}" if self.prefix else key)

    async def _c(self) -> S3Client:
        if self._client is None:
            if self._opening is None:  # concurrent first calls open one client
                self._opening = asyncio.ensure_future(S3Client(self.config).__aenter__())
            try:
                self._client = await asyncio.shield(self._opening)
            except BaseException:
                if self._opening.done():  # a failed open is tried again by the next call
                    self._opening = None
                raise
        return self._client

    async def get(self, key: str) -> bytes:
        return await (await self._c()).get(self._obj(key))

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return await (await self._c()).get_range(self._obj(key), offset, length)

    async def put(self, key: str, data: bytes) -> None:
        await (await self._c()).put(self._obj(key), data)

    async def exists(self, key: str) -> bool:
        try:
            await (await self._c()).head(self._obj(key))
            return True
        except NotFound:
            return False

    async def list(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        listing = await (await self._c()).list(self.bucket, self._obj(prefix).key, delimiter="")
        return sorted(key[strip:] for key, _ in listing)

    async def delete(self, key: str) -> None:
        await (await self._c()).delete(self._obj(key))

    async def close(self) -> None:
        client, self._client, self._opening = self._client, None, None
        if client is not None:
            await client.__aexit__(None, None, None)


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


def open_backend(uri: str, s3: StorageConfig | None = None):
    if uri.startswith("s3://"):
        where = parse_s3(uri)
        return S3Backend(where.bucket, where.key, s3 or StorageConfig.from_env())
    if uri.startswith("file://"):
        uri = uri[7:]
    if "://" in uri:
        raise ConfigError(f"{uri}: unsupported store scheme (use a path or s3://)")
    return LocalBackend(uri)
