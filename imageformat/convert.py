"""Convert an image into a store, and push an image from one store to another.

Convert streams each layer once: regular files are cut into chunks as they pass, and chunks
the destination does not hold are compressed into a spool of zstd frames in the work folder
(compressed bytes only; no layer is ever written out uncompressed). Once the final tree is
known, both convert and push walk the TOC's chunks in entry order, reuse every chunk the
destination already holds (in any tagged image), and pack the missing ones into new blobs of
about `blob_size` bytes. With the same input and the same destination contents the result is
byte-for-byte the same, so converting an image twice gives the same digests.
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
from warmstart.storage.progress import Counter, Progress

from .decompress import Budget, LayerLimits, open_layer
from .sources import Platform, SourceImage, open_source
from .pull import plan_ranges
from .store import ImageStore, blob_key, decode_chunk, gather_limited
from .toc import check_tree, encode_checked_toc

BLOB_SIZE = 64 << 20


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
            name: str | None, stats: tuple[int, int, int], profile=None,
            subject: Descriptor | None = None) -> Result:
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
                     Descriptor(MT_CHUNK_INDEX, idx_d, len(index_bytes)), tuple(blobs), profile,
                     subject=subject)
        return await store.put_image(m, name), toc_d
    digest, toc_d = run_sync(go())
    return Result(digest, toc_d, *stats)


class FrameSpool:
    """Compressed frames of new chunks, appended to one file in the work folder, read back
    in TOC order when blobs are packed. Holds each chunk once."""

    def __init__(self, workdir: str) -> None:
        self.f = open(os.path.join(workdir, "frames.spool"), "w+b")
        self.where: dict[str, tuple[int, int]] = {}
        self.end = 0
        self.dirty = False

    def add(self, digest: str, frame: bytes) -> None:
        self.f.write(frame)
        self.dirty = True
        self.where[digest] = (self.end, len(frame))
        self.end += len(frame)

    def frame(self, digest: str) -> bytes:
        if self.dirty:
            self.f.flush()
            self.dirty = False
        off, n = self.where[digest]
        data = os.pread(self.f.fileno(), n, off)
        if len(data) != n:
            raise OSError(f"{self.f.name}: short read of a spooled frame")
        return data

    def close(self) -> None:
        self.f.close()


class Chunker:
    """Cuts file content into chunks; new ones go to the compressor (and on to the spool)."""

    def __init__(self, chunking: Chunking, known: dict, compressor: OrderedCompressor,
                 progress: Progress | None) -> None:
        self.chunking, self.known, self.compressor = chunking, known, compressor
        self.progress = Counter(0, progress)  # layer sizes are unknown ahead: total 0
        self.seen: set[str] = set()

    def __call__(self, f, size: int) -> tuple[Chunk, ...]:
        chunks = []
        for digest, piece in iter_chunks(f, size, self.chunking):
            chunks.append(Chunk(digest, len(piece)))
            if digest not in self.seen and digest not in self.known:
                self.seen.add(digest)
                self.compressor.add(digest, piece)
            self.progress.add(len(piece))
        return tuple(chunks)


def build_tree(src: SourceImage, chunker: Chunker | None, limits: LayerLimits) -> Tree:
    """Applies the source's layers (or walks its rootfs) and cuts every file into chunks."""
    if src.rootfs is not None:
        tree = tree_from_dir(src.rootfs)
        for path in tree.sorted_paths():
            n = tree.nodes[path]
            if n.type == "reg" and chunker is not None:
                with open(n.data[0], "rb") as f:  # type: ignore[index]
                    f.seek(n.data[1])  # type: ignore[index]
                    n.chunks = chunker(f, n.size)
        return tree
    tree, budget = Tree(), Budget(limits)
    for layer in src.layers:
        with open_layer(layer, budget) as tar:
            apply_layer(tree, tar, chunker, layer.what)
    return tree


def convert(source: str, store: ImageStore, name: str | None, *, kind: str | None = None,
            chunking: Chunking = Chunking(), blob_size: int = BLOB_SIZE, level: int = 3,
            progress: Progress | None = None, workdir: str | None = None,
            limits: LayerLimits = LayerLimits(), platform: Platform | None = None,
            registry=None) -> Result:
    """SOURCE: see `sources.open_source`. `workdir` holds the spool of new compressed chunks
    (removed afterwards, also on failure); `limits` bound layer decompression."""
    with tempfile.TemporaryDirectory(prefix="warmstart-convert-", dir=workdir) as tmp, \
            open_source(source, kind, platform, registry) as src:
        known, sizes = run_sync(store.known_chunks())
        spool = FrameSpool(tmp)
        try:
            compressor = OrderedCompressor(spool, level)  # type: ignore[arg-type]
            try:
                tree = build_tree(src, Chunker(chunking, known, compressor, progress), limits)
            except BaseException:
                compressor.abort()
                raise
            compressor.close()
            packer = BlobPacker(store, blob_size)
            used: dict[str, Location | None] = {}
            entries = []
            for path in tree.sorted_paths():
                n = tree.nodes[path]
                chunks = n.chunks or () if n.type == "reg" else ()
                for c in chunks:
                    if c.digest not in used:
                        used[c.digest] = known.get(c.digest)
                        if used[c.digest] is None:
                            packer.add(c.digest, spool.frame(c.digest))
                entries.append(Entry(path, n.type, n.mode, n.uid, n.gid, n.mtime_ns,
                                     n.size if n.type == "reg" else 0, n.target, n.devmajor,
                                     n.devminor, tuple(sorted(n.xattrs.items())),
                                     tuple(chunks)))
            packer.flush()
        finally:
            spool.close()
        new = sum(1 for loc in used.values() if loc is None)
        locs = {d: (loc or packer.locations[d]) for d, loc in used.items()}
        return _finish(store, TOC(tuple(entries), chunking), locs,
                       {**sizes, **packer.blob_sizes}, name,
                       (new, len(used) - new, packer.uploaded), subject=src.manifest)


def push(src: ImageStore, ref: str, dst: ImageStore, name: str | None, *,
         blob_size: int = BLOB_SIZE, concurrency: int = 16,
         progress: Progress | None = None) -> Result:
    """Copies image `ref` from src to dst, uploading only chunks dst does not hold."""
    image = src.open_image(ref)
    known, sizes = run_sync(dst.known_chunks())
    packer = BlobPacker(dst, blob_size)
    used: dict[str, Location] = {}
    missing = [c for c in image.toc.unique_chunks() if c.digest not in known]
    counter = Counter(sum(c.size for c in missing), progress)  # bytes of chunks to copy
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
            counter.add(c.size)
    packer.flush()
    used.update(packer.locations)
    profile = None
    if image.profile is not None:
        from .manifest import encode_profile
        data = encode_profile(image.profile)
        profile = Descriptor(image.manifest.profile.media_type,  # type: ignore[union-attr]
                             run_sync(dst.put_blob(data)), len(data))
    return _finish(dst, image.toc, used, {**sizes, **packer.blob_sizes}, name,
                   (len(missing), len(used) - len(missing), packer.uploaded), profile,
                   image.manifest.subject)
