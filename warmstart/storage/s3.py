"""The one object-store client, and the sources built on it.

`S3Client` is the only place in warmstart that creates an S3 client: aiobotocore supplies
credentials (the whole AWS chain), SigV4 signing, HEAD, listings, PUT and multipart upload, with
botocore's own retries off; every request is retried by `retry.attempt` under one policy and
every failure is mapped by `errors.map_client_error`. Object bytes take the raw data path
(`http.ranged_get_into`: signed ranged GETs received straight into the buffer, over http or
https) unless `data_path='botocore'` asks for aiobotocore's streaming body.

Sources: `S3Object` (one object) and `HttpObject` (a plain http(s) URL: a presigned URL, any
web server or CDN), both through the same ranged-GET path.
"""

from __future__ import annotations

import asyncio
import errno
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

from warmstart.errors import RangeNotSatisfiable, Retryable, SourceError
from warmstart.storage.config import StorageConfig
from warmstart.storage.errors import map_client_error
from warmstart.storage.http import ConnectionPool, Url, ranged_get_into, tls_context
from warmstart.storage.retry import attempt
from warmstart.storage.source import Source, Target, in_thread
from warmstart.storage.uri import S3Uri

T = TypeVar("T")
SIGNATURE_REFRESH = 240.0  # SigV4 signatures are valid for 15 minutes; re-sign well before
PART_SIZE = 64 << 20  # parts of a multipart upload
MULTIPART_ABOVE = 1 << 30  # one PUT up to this size (S3 takes 5 GiB); multipart above it
# (the image store's blobs are "64 MiB" plus their last frame: as a multipart upload of a full
# part and a few kB, a push took 1.4x as long against localbucket)
BOTOCORE_BLOCK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str = ""
    mtime: float | None = None


def signed_host(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


class HttpTransport:
    """The keep-alive connection pool (http and https) plus the threads that block on it."""

    def __init__(self, config: StorageConfig, executor: Executor | None = None) -> None:
        self.config = config
        ctx = tls_context(config.ca_bundle, config.verify_tls)
        self.pool = ConnectionPool(config.connect_timeout, config.read_timeout, ctx)
        self._own = executor is None
        self.executor = executor or ThreadPoolExecutor(config.max_connections,
                                                       thread_name_prefix="warmstart-get")

    async def get_into(self, url: Url, offset: int, target: Target, what: str,
                       headers: dict[str, str] | None = None,
                       total: list[int] | None = None) -> dict[bytes, bytes]:
        return await in_thread(self.executor, ranged_get_into, self.pool, url, offset, target,
                               what, headers, total)

    def close(self) -> None:
        self.pool.close()
        if self._own:
            self.executor.shutdown(wait=False)


_LOADER = None


def _data_loader(session):
    """One botocore data loader for the process: it caches the parsed service models, which a
    fresh loader per client would parse again (~28 MB of dicts in reference cycles, held until
    the cyclic GC, per load or stream)."""
    global _LOADER
    if _LOADER is None:
        _LOADER = session.get_component("data_loader")
    return _LOADER


class S3Client:
    """One aiobotocore client and one raw-GET transport; use as `async with`."""

    def __init__(self, config: StorageConfig | None = None,
                 executor: Executor | None = None) -> None:
        self.config = config or StorageConfig.from_env()
        self.transport = HttpTransport(self.config, executor)
        self.data_path = self.config.data_path
        self._cm = None
        self._session = None
        self.client = None
        self._signatures: dict[S3Uri, tuple[Url, dict[str, str], float]] = {}
        self._sign_lock: asyncio.Lock | None = None

    async def __aenter__(self) -> "S3Client":
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        cfg = self.config
        self._session = get_session()
        self._session.register_component("data_loader", _data_loader(self._session))
        self._cm = self._session.create_client(
            "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region_name,
            aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key,
            aws_session_token=cfg.session_token,
            verify=(cfg.ca_bundle or True) if cfg.verify_tls else False,
            config=AioConfig(
                s3={"addressing_style": cfg.style},
                connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                # one retry loop only: ours (retry.attempt), per request
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=cfg.max_connections))
        self.client = await self._cm.__aenter__()
        self._sign_lock = asyncio.Lock()
        return self

    async def __aexit__(self, *exc) -> None:
        self.transport.close()
        if self._cm is not None:
            cm, self._cm, self.client = self._cm, None, None
            await cm.__aexit__(None, None, None)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]], retry: bool = True) -> T:
        async def once() -> T:
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - mapped to warmstart's tree right here
                raise map_client_error(exc, what) from exc
        if not retry:
            return await once()
        return await attempt(self.config.retry, what, once)

    # --- metadata ------------------------------------------------------------------------
    async def head(self, uri: S3Uri, retry: bool = True) -> ObjectInfo:
        resp = await self._call(str(uri), lambda: self.client.head_object(
            Bucket=uri.bucket, Key=uri.key), retry)
        modified = resp.get("LastModified")
        return ObjectInfo(int(resp["ContentLength"]), resp.get("ETag", ""),
                          modified.timestamp() if modified else None)

    async def list_page(self, bucket: str, prefix: str, delimiter: str = "",
                        token: str | None = None, max_keys: int = 1000) -> dict[str, Any]:
        """One ListObjectsV2 page, as botocore parses it."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        return await self._call(f"s3://{bucket}/{prefix}",
                                lambda: self.client.list_objects_v2(**kwargs))

    async def list(self, bucket: str, prefix: str, delimiter: str = "/") -> list[tuple[str, int]]:
        """(key, size) of the objects under `prefix` (directly under it with a delimiter)."""
        out: list[tuple[str, int]] = []
        token = None
        while True:
            page = await self.list_page(bucket, prefix, delimiter, token)
            out.extend((o["Key"], int(o["Size"])) for o in page.get("Contents", []))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return out

    # --- writes --------------------------------------------------------------------------
    async def put(self, uri: S3Uri, data: bytes | memoryview) -> None:
        if len(data) <= MULTIPART_ABOVE:
            await self._call(f"PUT {uri}", lambda: self.client.put_object(
                Bucket=uri.bucket, Key=uri.key, Body=bytes(data)))
            return
        await self._put_multipart(uri, memoryview(data))

    async def _put_multipart(self, uri: S3Uri, data: memoryview) -> None:
        what = f"PUT {uri} (multipart)"
        upload = await self._call(what, lambda: self.client.create_multipart_upload(
            Bucket=uri.bucket, Key=uri.key))
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, len(data), PART_SIZE), 1):
                body = bytes(data[start:start + PART_SIZE])
                resp = await self._call(f"{what} part {number}", lambda: self.client.upload_part(
                    Bucket=uri.bucket, Key=uri.key, UploadId=upload_id, PartNumber=number,
                    Body=body))
                parts.append({"ETag": resp["ETag"], "PartNumber": number})
            await self._call(what, lambda: self.client.complete_multipart_upload(
                Bucket=uri.bucket, Key=uri.key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}))
        except BaseException:
            try:  # leave no half-uploaded parts behind to be billed
                await self.client.abort_multipart_upload(Bucket=uri.bucket, Key=uri.key,
                                                         UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the original failure is what matters
                pass
            raise

    async def delete(self, uri: S3Uri) -> None:
        await self._call(f"DELETE {uri}", lambda: self.client.delete_object(
            Bucket=uri.bucket, Key=uri.key))

    # --- data ----------------------------------------------------------------------------
    async def signed(self, uri: S3Uri) -> tuple[Url, dict[str, str]]:
        """URL and SigV4 headers for ranged GETs of `uri`, re-signed every few minutes.
        `Range` is left out of the signed headers, so one signature serves every range."""
        assert self._sign_lock is not None, "S3Client used outside `async with`"
        async with self._sign_lock:
            hit = self._signatures.get(uri)
            if hit and time.monotonic() - hit[2] < SIGNATURE_REFRESH:
                return hit[0], hit[1]
            try:
                url = (await self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": uri.bucket, "Key": uri.key},
                    ExpiresIn=900)).split("?", 1)[0]
                headers = await self._auth_headers(url)
            except Exception as exc:  # noqa: BLE001
                raise map_client_error(exc, str(uri)) from exc
            if len(self._signatures) > 4096:
                self._signatures.clear()
            self._signatures[uri] = (Url.parse(url), headers, time.monotonic())
            return self._signatures[uri][0], headers

    async def _auth_headers(self, url: str) -> dict[str, str]:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        cfg = self.config
        if cfg.access_key and cfg.secret_key:
            from botocore.credentials import ReadOnlyCredentials

            credentials = ReadOnlyCredentials(cfg.access_key, cfg.secret_key,
                                              cfg.session_token)
        else:
            chain = await self._session.get_credentials()
            credentials = await chain.get_frozen_credentials() if chain is not None else None
        if credentials is None:
            return {}
        request = AWSRequest(method="GET", url=url)
        request.headers["host"] = signed_host(url)  # the Host we sign is the Host we send
        S3SigV4Auth(credentials, "s3", self.client.meta.region_name).add_auth(request)
        return dict(request.headers.items())

    async def get_into(self, uri: S3Uri, offset: int, target: Target,
                       retry: bool = True, etag: str | None = None) -> None:
        """Bytes [offset, offset + target.nbytes) of `uri` into `target`. With `etag`, an
        object that changed meanwhile is a Retryable error, never mixed bytes."""
        if target.nbytes == 0:
            return
        what = f"{uri} bytes {offset}-{offset + target.nbytes - 1}"

        async def once() -> None:
            if self.data_path == "botocore":
                got = await self._get_botocore(uri, offset, target, what)
            else:
                url, headers = await self.signed(uri)
                answer = await self.transport.get_into(url, offset, target, what, headers)
                got = answer.get(b"etag", b"").decode("latin-1")
            if etag and got and got != etag:
                raise Retryable(errno.ESTALE, f"{what}: the object changed while it was read "
                                              f"(ETag {got}, was {etag})")
        if retry:
            await attempt(self.config.retry, what, once)
        else:
            await once()

    async def get_range(self, uri: S3Uri, offset: int, length: int,
                        etag: str | None = None) -> bytes:
        buf = bytearray(length)
        await self.get_into(uri, offset, Target.of(buf), etag=etag)
        return bytes(buf)

    async def get(self, uri: S3Uri) -> bytes:
        """The whole object (small documents: manifests, indexes, tags)."""
        async def go() -> bytes:
            resp = await self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            async with resp["Body"] as body:
                return await body.read()
        return await self._call(f"GET {uri}", go)

    async def _get_botocore(self, uri: S3Uri, offset: int, target: Target, what: str) -> str:
        pos = 0
        try:
            resp = await self.client.get_object(
                Bucket=uri.bucket, Key=uri.key,
                Range=f"bytes={offset}-{offset + target.nbytes - 1}")
            async with resp["Body"] as body:
                async for block in body.iter_chunks(BOTOCORE_BLOCK):
                    end = pos + len(block)
                    if end > target.nbytes:
                        raise Retryable(errno.EPROTO, f"{what}: body longer than the range")
                    target.view[pos:end] = block
                    pos = end
        except Exception as exc:  # noqa: BLE001
            raise map_client_error(exc, what) from exc
        if pos != target.nbytes:
            raise Retryable(errno.EPIPE, f"{what}: body ended after {pos} bytes")
        return resp.get("ETag", "")


class S3Object(Source):
    """One S3 object. Reads are tried once each: wrap it in a `RetryingSource`."""

    backend = "s3"

    def __init__(self, client: S3Client, uri: S3Uri, size: int | None = None) -> None:
        self.client = client
        self.uri = uri
        self.name = str(uri)
        self._size = size

    async def size(self) -> int:
        if self._size is None:
            self._size = (await self.client.head(self.uri, retry=False)).size
        return self._size

    async def read_into(self, offset: int, target: Target) -> None:
        await self.client.get_into(self.uri, offset, target, retry=False)


class HttpObject(Source):
    """A plain http(s) URL (a presigned URL, any web server or CDN), unsigned ranged GETs.
    Its size comes from the Content-Range of a one-byte GET (a presigned GET URL does not
    allow HEAD). Reads are tried once each: wrap it in a `RetryingSource`."""

    backend = "https"

    def __init__(self, transport: HttpTransport, url: str) -> None:
        self.transport = transport
        self.url = Url.parse(url)
        self.name = str(self.url)  # without the query: presigned signatures stay out of logs
        self.backend = self.url.scheme
        self._size: int | None = None

    async def size(self) -> int:
        if self._size is None:
            total: list[int] = []
            probe = bytearray(1)
            try:
                await self.transport.get_into(self.url, 0, Target.of(probe), self.name,
                                              total=total)
            except RangeNotSatisfiable:
                total = [0]  # an empty object answers 416 to any range
            if not total:
                raise SourceError(errno.EPROTO, f"{self.name}: server did not say the "
                                                f"object's size (no Content-Range total)")
            self._size = total[0]
        return self._size

    async def read_into(self, offset: int, target: Target) -> None:
        if target.nbytes == 0:
            return
        size = await self.size()
        if offset + target.nbytes > size:
            raise RangeNotSatisfiable(errno.EINVAL, f"{self.name}: bytes {offset}-"
                                                  f"{offset + target.nbytes - 1} are past "
                                                  f"its end ({size} bytes)")
        await self.transport.get_into(self.url, offset, target,
                                      f"{self.name} bytes {offset}-{offset + target.nbytes - 1}")
