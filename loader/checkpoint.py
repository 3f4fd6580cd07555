"""Resolve a URI into a checkpoint: its files (as sources) and their validated headers.

Accepted forms, local or s3://: a `.safetensors` file; a folder / prefix (its index when it
has one, else every `*.safetensors` directly in it); a `*.safetensors.index.json` file. A plain
http(s):// URL (a presigned URL, any web server) names one file or an index whose shards sit
beside it (a web server has no listing).
Headers of all files are fetched in parallel; index and headers must agree exactly.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
from concurrent.futures import Executor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Callable

from warmstart.errors import (DuplicateTensor, FormatError, IntegrityError, NotFound,
                              ShardIndexError)
from warmstart.loader.config import LoaderConfig
from warmstart.loader.header import PREFIX_BYTES, Header, header_length, parse_header
from warmstart.loader.index import INDEX_SUFFIX, ShardIndex, parse_index
from warmstart.loader.sources.base import Source
from warmstart.loader.sources.local import LocalFileSource
from warmstart.loader.sources.retry import RetryingSource, RetryPolicy
from warmstart.loader.sources.s3 import (HttpObject, HttpTransport, S3Client, S3Object,
                                         open_client, storage_config)
from warmstart.loader.sums import MAX_SIDECAR_BYTES, VerifyingSource, parse_sums
from warmstart.loader.sums import SUFFIX as SUMS_SUFFIX
from warmstart.storage.uri import HttpUri, S3Uri, parse_s3, parse_uri

FIRST_READ = 1 << 20  # one request usually covers the whole header
DEFAULT_INDEX = "model" + INDEX_SUFFIX


@dataclass(frozen=True)
class CheckpointFile:
    source: Source
    header: Header


@dataclass(frozen=True)
class Checkpoint:
    uri: str
    files: tuple[CheckpointFile, ...]
    index: ShardIndex | None

    @property
    def nbytes(self) -> int:
        return sum(f.header.file_size - f.header.data_start for f in self.files)


async def read_header(source: Source) -> Header:
    size = await source.size()
    first = await source.read(0, min(size, FIRST_READ))
    length = header_length(first, size, source.name)
    if PREFIX_BYTES + length > len(first):
        first += await source.read(len(first), PREFIX_BYTES + length - len(first))
    return parse_header(first, size, source.name)


def _pick_index(names: list[str], where: str) -> str | None:
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if DEFAULT_INDEX in indexes:
        return DEFAULT_INDEX
    if len(indexes) > 1:
        raise ShardIndexError(f"{where}: several shard indexes ({', '.join(sorted(indexes))});"
                              f" name the one to load")
    return indexes[0] if indexes else None


SourceWrapper = Callable[[Source], Source]


class _Resolver:
    def __init__(self, config: LoaderConfig, executor: Executor, stack: AsyncExitStack,
                 wrap_source: SourceWrapper | None = None):
        self.wrap_source = wrap_source
        self.config = config
        self.executor = executor
        self.stack = stack
        self.policy = RetryPolicy(config.max_attempts, config.retry_base_delay,
                                  config.retry_max_delay)
        self._s3: S3Client | None = None
        self._http: HttpTransport | None = None

    def _wrap(self, source: Source) -> Source:
        self.stack.push_async_callback(source.close)
        if self.wrap_source is not None:
            source = self.wrap_source(source)
        return RetryingSource(source, self.policy)

    def local(self, path: str) -> Source:
        return self._wrap(LocalFileSource(path, self.executor, direct=self.config.direct_io))

    async def s3(self, uri: S3Uri, size: int | None = None) -> Source:
        if self._s3 is None:
            self._s3 = await self.stack.enter_async_context(open_client(self.config,
                                                                        self.executor))
        return self._wrap(S3Object(self._s3, uri, size))

    def http(self, url: str) -> Source:
        if self._http is None:
            self._http = HttpTransport(storage_config(self.config), self.executor)
            self.stack.callback(self._http.close)
        return self._wrap(HttpObject(self._http, url))

    async def open(self, location: str, size: int | None = None) -> Source:
        """A source for one file: local path, s3:// or http(s):// URL."""
        parsed = parse_uri(location)
        if isinstance(parsed, S3Uri):
            return await self.s3(parsed, size)
        if isinstance(parsed, HttpUri):
            return self.http(parsed.url)
        return self.local(parsed.path)

    async def resolve(self, uri: str) -> tuple[list[Source], ShardIndex | None]:
        parsed = parse_uri(uri)
        if isinstance(parsed, S3Uri):
            return await self._resolve_s3(parsed)
        if isinstance(parsed, HttpUri):
            source = self.http(parsed.url)
            if source.name.endswith(".json"):
                return await self._from_index(source, query=parsed.url.partition("?")[2])
            return [source], None
        path = parsed.path
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            index_name = _pick_index(names, path)
            if index_name:
                return await self._from_index(self.local(os.path.join(path, index_name)))
            files = [n for n in names if n.endswith(".safetensors")
                     and os.path.isfile(os.path.join(path, n))]
            if not files:
                raise NotFound(errno.ENOENT, f"{path}: folder has no .safetensors files")
            return [self.local(os.path.join(path, n)) for n in files], None
        if path.endswith(".json"):
            return await self._from_index(self.local(path))
        return [self.local(path)], None

    async def _resolve_s3(self, uri: S3Uri) -> tuple[list[Source], ShardIndex | None]:
        if uri.key.endswith(".json"):
            return await self._from_index(await self.s3(uri))
        if uri.key.endswith(".safetensors"):
            return [await self.s3(uri)], None
        prefix = uri.key.rstrip("/") + "/" if uri.key else ""
        if self._s3 is None:
            await self.s3(uri)  # opens the shared client
        listing = await self._s3.list(uri.bucket, prefix)
        names = {key[len(prefix):]: size for key, size in listing}
        index_name = _pick_index(sorted(names), str(uri))
        if index_name:
            return await self._from_index(
                await self.s3(S3Uri(uri.bucket, prefix + index_name), names[index_name]))
        files = sorted(n for n in names if n.endswith(".safetensors"))
        if not files:
            raise NotFound(errno.ENOENT, f"s3://{uri.bucket}/{prefix}: no .safetensors objects "
                                         f"under this prefix")
        return [await self.s3(S3Uri(uri.bucket, prefix + n), names[n]) for n in files], None

    async def _from_index(self, index_source: Source,
                          query: str = "") -> tuple[list[Source], ShardIndex]:
        raw = await index_source.read(0, await index_source.size())
        index = parse_index(raw, index_source.name)
        base = posixpath.dirname(index_source.name)

        async def open_shard(shard: str) -> Source:
            location = posixpath.join(base, shard)
            if query and location.startswith(("http://", "https://")):
                location += "?" + query  # shards of a URL index: same (presigned) query
            try:
                source = await self.open(location, sizes.get(location))
                await source.size()  # a HEAD only when the listing did not have it
                return source
            except NotFound as exc:
                raise NotFound(errno.ENOENT, f"{index_source.name}: shard {shard!r} is missing "
                                             f"({exc})") from exc

        sizes: dict[str, int] = {}
        if base.startswith("s3://") and self._s3 is not None:
            # one LIST gives every shard's size, instead of a HEAD per shard
            uri = parse_s3(base + "/")
            sizes = {f"s3://{uri.bucket}/{key}": size
                     for key, size in await self._s3.list(uri.bucket, uri.key)}
        sources = list(await asyncio.gather(*(open_shard(s) for s in index.shards)))
        return sources, index


def _check_names(files: list[CheckpointFile], index: ShardIndex | None) -> None:
    owner: dict[str, str] = {}
    for f in files:
        for t in f.header.tensors:
            if t.name in owner:
                raise DuplicateTensor(f"tensor {t.name!r} is in both {owner[t.name]} and "
                                      f"{f.source.name}")
            owner[t.name] = f.source.name
    if index is None:
        return
    for name, shard in index.weight_map.items():
        if name not in owner:
            raise ShardIndexError(f"{index.source}: lists tensor {name!r} in {shard!r}, but "
                                  f"that shard has no such tensor")
        if owner[name] != posixpath.join(posixpath.dirname(index.source), shard):
            raise ShardIndexError(f"{index.source}: lists tensor {name!r} in {shard!r}, but it "
                                  f"is in {owner[name]}")
    extra = sorted(set(owner) - set(index.weight_map))
    if extra:
        raise ShardIndexError(f"{index.source}: shards hold tensors the index does not list: "
                              f"{', '.join(map(repr, extra[:5]))}")


async def _with_sums(resolver: "_Resolver", source: Source) -> Source:
    """`source` (a RetryingSource) re-wrapped so each block it reads is checked against the
    shard's `.sums` sidecar before the retry layer sees it."""
    inner = source.inner
    where = source.name + SUMS_SUFFIX
    try:
        sidecar = await resolver.open(where)
        size = min(await sidecar.size(), MAX_SIDECAR_BYTES + 1)
    except NotFound:
        raise NotFound(errno.ENOENT, f"{where}: no block-sums sidecar for {source.name} "
                                     f"(verify=True needs one; write it with `warmstart sums "
                                     f"PATH` and upload it next to the shard)") from None
    for attempt in range(resolver.policy.max_attempts):  # damaged on the way: read it again
        try:
            sums = parse_sums(await sidecar.read(0, size), where)
            break
        except FormatError:
            if attempt + 1 == resolver.policy.max_attempts:
                raise
    actual = await inner.size()
    if sums.size != actual:
        raise IntegrityError(f"{where}: describes {sums.size} bytes, but {source.name} has "
                             f"{actual}")
    return RetryingSource(VerifyingSource(inner, sums, resolver.executor), resolver.policy)


async def open_checkpoint(uri: str, config: LoaderConfig, executor: Executor,
                          stack: AsyncExitStack,
                          wrap_source: SourceWrapper | None = None) -> Checkpoint:
    """Resolves `uri` and validates every header; sources close when `stack` closes.
    `wrap_source`, when given, wraps every source opened (beneath the retry layer)."""
    resolver = _Resolver(config, executor, stack, wrap_source)
    sources, index = await resolver.resolve(str(uri))
    if config.verify:
        sources = list(await asyncio.gather(*(_with_sums(resolver, s) for s in sources)))
    headers = await asyncio.gather(*(read_header(s) for s in sources))
    files = [CheckpointFile(s, h) for s, h in zip(sources, headers)]
    _check_names(files, index)
    return Checkpoint(uri=str(uri), files=tuple(files), index=index)
