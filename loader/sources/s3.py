"""S3 objects through aiobotocore (credentials, signing, listing, errors) with a choice of
data path: signed ranged GETs received straight into the buffer ('raw', http endpoints), or
aiobotocore's own streaming body ('botocore', any endpoint)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from urllib.parse import urlsplit

from warmstart.errors import (AccessDenied, EndpointUnreachable, NotFound, Retryable,
                              SourceError, WarmstartError)
from warmstart.loader.config import LoaderConfig
from warmstart.loader.sources.base import Source, Target, in_thread
from warmstart.loader.sources.http import (DENIED_CODES, NOT_FOUND_CODES, RETRY_CODES,
                                           ConnectionPool, Url, ranged_get_into)

SIGNATURE_REFRESH = 240.0  # SigV4 signatures are valid for 15 minutes; re-sign well before


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise NotFound(errno.ENOENT, f"{uri}: no bucket in the URI")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def map_botocore_error(exc: BaseException, what: str) -> WarmstartError:
    """Turns botocore/aiohttp failures into warmstart's exception tree."""
    import botocore.exceptions as bx

    if isinstance(exc, WarmstartError):
        return exc
    if isinstance(exc, bx.NoCredentialsError):
        return AccessDenied(errno.EACCES, f"{what}: no AWS credentials found (set "
                                          f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                                          f"or an instance role)")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"{code or status}: {err.get('Message') or 'no message'}"
        if code in NOT_FOUND_CODES or status == 404:
            return NotFound(errno.ENOENT, f"{what}: not found ({detail})")
        if code in DENIED_CODES or status in (401, 403):
            return AccessDenied(errno.EACCES, f"{what}: access denied ({detail})")
        if code in RETRY_CODES or status >= 500 or status == 429:
            return Retryable(errno.EAGAIN, f"{what}: transient server error ({detail})")
        return SourceError(errno.EIO, f"{what}: request failed ({detail})")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return EndpointUnreachable(errno.ECONNREFUSED, f"{what}: endpoint unreachable ({exc})")
    if isinstance(exc, (bx.ReadTimeoutError, bx.ResponseStreamingError, ConnectionError,
                        asyncio.TimeoutError, bx.IncompleteReadError)):
        return Retryable(errno.EAGAIN, f"{what}: transient failure ({exc})")
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return Retryable(errno.EAGAIN, f"{what}: transient failure ({exc})")
    except ImportError:  # pragma: no cover
        pass
    return SourceError(errno.EIO, f"{what}: {type(exc).__name__}: {exc}")


def signed_host(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


class S3Client:
    """One aiobotocore client plus a raw-socket pool, shared by all objects of one load."""

    def __init__(self, config: LoaderConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.endpoint = (config.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                         or os.environ.get("AWS_ENDPOINT_URL"))
        style = config.s3_addressing_style
        if style == "auto":
            style = "path" if self.endpoint else "auto"
        self._style = style
        path = config.s3_data_path
        if path == "auto":
            path = "raw" if (self.endpoint or "").startswith("http://") else "botocore"
        self.data_path = path
        self.pool = ConnectionPool(config.connect_timeout, config.read_timeout)
        self._cm = None
        self._session = None
        self.client = None

    async def __aenter__(self) -> "S3Client":
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        conc = self.config.read_concurrency("s3")
        self._session = get_session()
        self._cm = self._session.create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.config.s3_region,
            config=AioConfig(
                s3={"addressing_style": self._style},
                connect_timeout=self.config.connect_timeout,
                read_timeout=self.config.read_timeout,
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=max(10, conc)))
        self.client = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        self.pool.close()
        if self._cm is not None:
            await self._cm.__aexit__(*exc)

    async def head(self, uri: S3Uri) -> int:
        try:
            resp = await self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except Exception as exc:  # noqa: BLE001 - mapped to our tree right here
            raise map_botocore_error(exc, str(uri)) from exc
        return int(resp["ContentLength"])

    async def list(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of the objects directly under `prefix` (not in sub-prefixes)."""
        out: list[tuple[str, int]] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                out.extend((o["Key"], int(o["Size"])) for o in page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001
            raise map_botocore_error(exc, f"s3://{bucket}/{prefix}") from exc
        return out

    async def object_url(self, uri: S3Uri) -> str:
        """The URL botocore would send a GetObject for `uri` to (quoting, addressing)."""
        presigned = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": uri.bucket, "Key": uri.key}, ExpiresIn=900)
        return presigned.split("?", 1)[0]

    async def auth_headers(self, url: str) -> dict[str, str]:
        """SigV4 headers for a GET of `url`. `Range` is left out of the signed headers, so
        one signature serves every ranged GET of the object while it is valid."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = await self._session.get_credentials()
        if credentials is None:
            return {}
        frozen = await credentials.get_frozen_credentials()
        request = AWSRequest(method="GET", url=url)
        # The Host we sign is the Host we send (lower-case, default port dropped).
        request.headers["host"] = signed_host(url)
        S3SigV4Auth(frozen, "s3", self.client.meta.region_name).add_auth(request)
        return {k: v for k, v in request.headers.items()}

    async def get_into_botocore(self, uri: S3Uri, offset: int, target: Target) -> None:
        what = f"{uri} bytes {offset}-{offset + target.nbytes - 1}"
        try:
            resp = await self.client.get_object(
                Bucket=uri.bucket, Key=uri.key,
                Range=f"bytes={offset}-{offset + target.nbytes - 1}")
            pos = 0
            async with resp["Body"] as body:
                async for block in body.iter_chunks(1 << 20):
                    end = pos + len(block)
                    if end > target.nbytes:
                        raise Retryable(errno.EPROTO, f"{what}: body longer than the range")
                    target.view[pos:end] = block
                    pos = end
        except Exception as exc:  # noqa: BLE001
            raise map_botocore_error(exc, what) from exc
        if pos != target.nbytes:
            raise Retryable(errno.EPIPE, f"{what}: body ended after {pos} bytes")


class S3Object(Source):
    backend = "s3"

    def __init__(self, client: S3Client, uri: S3Uri, size: int | None = None) -> None:
        self.client = client
        self.uri = uri
        self.name = str(uri)
        self._size = size
        self._signature: tuple[Url, dict[str, str], float] | None = None
        self._sign_lock = asyncio.Lock()

    async def size(self) -> int:
        if self._size is None:
            self._size = await self.client.head(self.uri)
        return self._size

    async def _signed(self) -> tuple[Url, dict[str, str]]:
        async with self._sign_lock:
            fresh = self._signature and time.monotonic() - self._signature[2] < SIGNATURE_REFRESH
            if not fresh:
                try:
                    url = await self.client.object_url(self.uri)
                    headers = await self.client.auth_headers(url)
                except Exception as exc:  # noqa: BLE001
                    raise map_botocore_error(exc, self.name) from exc
                self._signature = (Url.parse(url), headers, time.monotonic())
            return self._signature[0], self._signature[1]

    async def read_into(self, offset: int, target: Target) -> None:
        if target.nbytes == 0:
            return
        if self.client.data_path == "botocore":
            await self.client.get_into_botocore(self.uri, offset, target)
            return
        url, headers = await self._signed()
        what = f"{self.name} bytes {offset}-{offset + target.nbytes - 1}"
        await in_thread(self.client.executor, ranged_get_into, self.client.pool, url, offset,
                        target, what, headers)
