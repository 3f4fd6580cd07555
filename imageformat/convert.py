"""Convert an image into a store, and push an image from one store to another.

Both walk the TOC's chunks in entry order and reuse every chunk the destination already
holds (in any tagged image); only missing chunks are compressed with zstd and packed into
new blobs of about `blob_size` bytes. With the same input and the same destination contents
the result is byte-for-byte the same, so converting an image twice gives the same digests.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from ._aio import run_sync
from .chunking import iter_chunks
from .layers import Tree, apply_layer, tree_from_dir
from .manifest import encode_chunk_index
from .model import (MT_BLOB, MT_CHUNK_INDEX, MT_TOC, TOC, Chunk, Chunking, Descriptor, Entry,
                    Location, Manifest)
from .sources import detect_kind, docker_archive_layers, oci_layers
from .pull import plan_ranges
from .store import ImageStore, blob_key, decode_chunk, gather_limited
from .toc import check_tree, encode_checked_toc

BLOB_SIZE = 64 << 20
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Result:
    digest: str  # manifest digest
    toc_digest: str
    new_chunks: int
    reused_chunks: int
    new_bytes: int  # compressed bytes uploaded in new blobs


class BlobPacker:
    """Appends zstd frames to a blob and uploads it once it reaches the target size."""

    def __init__(self, store: ImageStore, blob_size: int) -> None:
        self.store, self.blob_size = store, blob_size
        self.buf = bytearray()
        self.pending: list[tuple[str, int, int]] = []
        self.locations: dict[str, Location] = {}
        self.blob_sizes: dict[str, int] = {}
        self.uploaded = 0

    def add(self, digest: str, frame: bytes) -> None:
        self.pending.append((digest, len(self.buf), len(frame)))
        self.buf += frame
        if len(self.buf) >= self.blob_size:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        data = bytes(self.buf)
        blob = run_sync(self.store.put_blob(data))
        self.blob_sizes[blob] = len(data)
        self.uploaded += len(data)
        for digest, off, n in self.pending:
            self.locations[digest] = Location(blob, off, n)
        self.buf.clear()
        self.pending.clear()


class OrderedCompressor:
    """Compresses chunks on a few threads (zstd releases the GIL) and hands the frames to
    the packer in submission order, so the output stays deterministic."""

    def __init__(self, packer: BlobPacker, level: int, threads: int | None = None,
                 window: int = 64) -> None:
        self.packer, self.window = packer, window
        self.local = threading.local()
        self.level = level
        self.pool = ThreadPoolExecutor(threads or min(os.cpu_count() or 1, 8),
                                       thread_name_prefix="warmstart-zstd")
        self.pending: deque[tuple[str, Future]] = deque()

    def _compress(self, piece: bytes) -> bytes:
        zc = getattr(self.local, "zc", None)
        if zc is None:
            zc = self.local.zc = zstandard.ZstdCompressor(level=self.level)
        return zc.compress(piece)

    def add(self, digest: str, piece: bytes) -> None:
        self.pending.append((digest, self.pool.submit(self._compress, piece)))
        while len(self.pending) > self.window:
            self._drain_one()

    def _drain_one(self) -> None:
        digest, fut = self.pending.popleft()
        self.packer.add(digest, fut.result())

    def close(self) -> None:
        try:
            while self.pending:
                self._drain_one()
        finally:
            self.abort()

    def abort(self) -> None:
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _finish(store: ImageStore, toc: TOC, used: dict[str, Location], sizes: dict[str, int],
            name: str | None, stats: tuple[int, int, int], profile=None) -> Result:
    check_tree(toc.entries)
    toc_bytes = encode_checked_toc(toc)
    index_bytes = encode_chunk_index(used)
    blobs, seen = [], set()
    for c in toc.unique_chunks():
        b = used[c.digest].blob
        if b not in seen:
            seen.add(b)
            blobs.append(Descriptor(MT_BLOB, b, sizes[b]))

    async def go():
        toc_d = await store.put_blob(toc_bytes)
        idx_d = await store.put_blob(index_bytes)
        m = Manifest(Descriptor(MT_TOC, toc_d, len(toc_bytes)),
                     Descriptor(MT_CHUNK_INDEX, idx_d, len(index_bytes)), tuple(blobs), profile)
        return await store.put_image(m, name), toc_d
    digest, toc_d = run_sync(go())
    return Result(digest, toc_d, *stats)


def split_source(source: str) -> tuple[str, str | None]:
    """`DIR:TAG` / `FILE:REPO:TAG` -> (path, tag); a path that exists as given has no tag."""
    if os.path.exists(source):
        return source, None
    for i, ch in enumerate(source):
        if ch == ":" and os.path.exists(source[:i]):
            return source[:i], source[i + 1:]
    return source, None


def build_tree(source: str, workdir: str, kind: str | None = None) -> Tree:
    """SOURCE is a rootfs folder, an OCI layout (`DIR` or `DIR:TAG`) or a docker-archive
    (`FILE` or `FILE:TAG`)."""
    path, ref = split_source(source)
    kind = kind or detect_kind(path)
    if kind == "rootfs":
        return tree_from_dir(path)
    tars = (oci_layers if kind == "oci" else docker_archive_layers)(path, ref, workdir)
    tree = Tree()
    for t in tars:
        apply_layer(tree, t)
    return tree


def _file_chunks(node, chunking: Chunking, used: dict, known: dict,
                 compressor: OrderedCompressor, progress: Progress | None) -> list[Chunk]:
    """Chunks one regular file; new chunks go to the compressor, known ones are reused."""
    chunks: list[Chunk] = []
    with open(node.data[0], "rb") as f:
        f.seek(node.data[1])
        for digest, piece in iter_chunks(f, node.size, chunking):
            chunks.append(Chunk(digest, len(piece)))
            if digest not in used:
                used[digest] = known.get(digest)
                if used[digest] is None:
                    compressor.add(digest, piece)
            if progress:
                progress(len(piece))
    return chunks


def convert(source: str, store: ImageStore, name: str | None, *, kind: str | None = None,
            chunking: Chunking = Chunking(), blob_size: int = BLOB_SIZE, level: int = 3,
            progress: Progress | None = None, workdir: str | None = None) -> Result:
    with tempfile.TemporaryDirectory(prefix="warmstart-convert-", dir=workdir) as tmp:
        tree = build_tree(source, tmp, kind)
        known, sizes = run_sync(store.known_chunks())
        packer = BlobPacker(store, blob_size)
        compressor = OrderedCompressor(packer, level)
        used: dict[str, Location | None] = {}
        entries = []
        try:
            for path in tree.sorted_paths():
                n = tree.nodes[path]
                chunks = []
                if n.type == "reg" and n.size:
                    chunks = _file_chunks(n, chunking, used, known, compressor, progress)
                entries.append(Entry(path, n.type, n.mode, n.uid, n.gid, n.mtime_ns,
                                     n.size if n.type == "reg" else 0, n.target, n.devmajor,
                                     n.devminor, tuple(sorted(n.xattrs.items())),
                                     tuple(chunks)))
        except BaseException:
            compressor.abort()
            raise
        compressor.close()
        packer.flush()
        new = sum(1 for loc in used.values() if loc is None)
        locs = {d: (loc or packer.locations[d]) for d, loc in used.items()}
        return _finish(store, TOC(tuple(entries), chunking), locs,
                       {**sizes, **packer.blob_sizes}, name,
                       (new, len(used) - new, packer.uploaded))


def push(src: ImageStore, ref: str, dst: ImageStore, name: str | None, *,
         blob_size: int = BLOB_SIZE, concurrency: int = 16,
         progress: Progress | None = None) -> Result:
    """Copies image `ref` from src to dst, uploading only chunks dst does not hold."""
    image = src.open_image(ref)
    known, sizes = run_sync(dst.known_chunks())
    packer = BlobPacker(dst, blob_size)
    used: dict[str, Location] = {}
    missing = [c for c in image.toc.unique_chunks() if c.digest not in known]
    for c in image.toc.unique_chunks():
        if c.digest in known:
            used[c.digest] = known[c.digest]
    batch = 256  # chunks per round: bounds memory; ranges are coalesced inside a round
    locs = image.index.locations
    for i in range(0, len(missing), batch):
        part = missing[i:i + batch]
        reads = plan_ranges(part, locs, max_gap=64 << 10, max_len=8 << 20)
        datas = run_sync(gather_limited(
            [src.backend.get_range(blob_key(r.blob), r.offset, r.length) for r in reads],
            concurrency))
        frames = {}
        for r, data in zip(reads, datas):
            for c, off in r.chunks:
                frames[c.digest] = data[off:off + locs[c.digest].csize]
        for c in part:
            decode_chunk(frames[c.digest], c)  # never copy a chunk that is not what it claims
            packer.add(c.digest, frames[c.digest])
            if progress:
                progress(c.size)
    packer.flush()
    used.update(packer.locations)
    profile = None
    if image.profile is not None:
        from .manifest import encode_profile
        data = encode_profile(image.profile)
        profile = Descriptor(image.manifest.profile.media_type,  # type: ignore[union-attr]
                             run_sync(dst.put_blob(data)), len(data))
    return _finish(dst, image.toc, used, {**sizes, **packer.blob_sizes}, name,
                   (len(missing), len(used) - len(missing), packer.uploaded), profile)
