"""Full pull: materialize an image's rootfs into a plain folder, fetching blobs in parallel.

`plan_ranges` (pure) coalesces chunk frames that lie close together in a blob into one
ranged read; every chunk is verified before its bytes are written. Files are created before
any symlink exists and with O_NOFOLLOW, so no entry can write outside the destination.

The folder is a plain host folder, not a `nosuid,nodev` mount, so by default pull writes no
privilege into it, whoever runs it: device nodes are skipped, setuid/setgid bits of files are
cleared (a setgid directory keeps its bit) and `security.capability` xattrs are dropped (as rootless unpackers do). `PullPolicy` turns
each back on, for a root that will be used as a container's root filesystem.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from warmstart.errors import ConfigError
from warmstart.storage.progress import Counter, Progress

from ._aio import run_sync
from .model import Chunk, Entry, Location
from .store import Image, ImageStore, decode_chunk

log = logging.getLogger("warmstart.imageformat")


SETID_BITS = 0o6000
CAPABILITY_XATTR = "security.capability"


@dataclass(frozen=True)
class PullPolicy:
    devices: bool = False  # create char/block device nodes (needs root)
    setid: bool = False  # keep setuid/setgid bits and file capabilities


@dataclass
class PullReport:
    skipped_devices: int = 0
    cleared_setid: int = 0
    dropped_capabilities: int = 0


@dataclass(frozen=True)
class RangeRead:
    blob: str
    offset: int
    length: int
    chunks: tuple[tuple[Chunk, int], ...]  # (chunk, offset of its frame inside this read)


def plan_ranges(chunks: list[Chunk], locations: dict[str, Location], max_gap: int = 1 << 20,
                max_len: int = 16 << 20) -> list[RangeRead]:
    """Groups chunk frames by blob and merges neighbours closer than `max_gap` bytes."""
    by_blob: dict[str, list[tuple[Location, Chunk]]] = {}
    for c in chunks:
        loc = locations[c.digest]
        by_blob.setdefault(loc.blob, []).append((loc, c))
    out: list[RangeRead] = []
    for blob in sorted(by_blob):
        items = sorted(by_blob[blob], key=lambda lc: lc[0].offset)
        start = end = -1
        group: list[tuple[Location, Chunk]] = []
        for loc, c in items + [(None, None)]:  # type: ignore[list-item]
            if group and (loc is None or loc.offset - end > max_gap
                          or loc.offset + loc.csize - start > max_len):
                out.append(RangeRead(blob, start, end - start,
                                     tuple((ch, lo.offset - start) for lo, ch in group)))
                group = []
            if loc is None:
                break
            if not group:
                start = loc.offset
                end = loc.offset
            group.append((loc, c))
            end = max(end, loc.offset + loc.csize)
    return out


def _create_tree(dest: str, entries: tuple[Entry, ...]) -> None:
    for e in entries:
        p = os.path.join(dest, e.path)
        if e.type == "dir" and e.path != ".":
            os.mkdir(p, 0o700)
        elif e.type == "reg":
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, e.size)
            finally:
                os.close(fd)


def _finish_entry(dest: str, e: Entry, root: bool, policy: PullPolicy,
                  report: PullReport) -> None:
    p = os.path.join(dest, e.path)
    if e.type == "hardlink":
        return
    if root:
        os.chown(p, e.uid, e.gid, follow_symlinks=False)
    if e.type != "symlink":
        mode = e.mode
        if mode & SETID_BITS and e.type != "dir" and not policy.setid:
            mode &= ~SETID_BITS
            report.cleared_setid += 1
        os.chmod(p, mode)
    for k, v in e.xattrs:
        if k == CAPABILITY_XATTR and not policy.setid:
            report.dropped_capabilities += 1
            continue
        try:
            os.setxattr(p, k, v, follow_symlinks=False)
        except OSError as exc:
            log.warning("pull: cannot set xattr %s on %s: %s", k, e.path, exc)
    os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def pull(store: ImageStore, ref: str, dest: str, *, concurrency: int = 8,
         progress: Progress | None = None,
         policy: PullPolicy = PullPolicy(), report: PullReport | None = None) -> Image:
    """Writes image `ref` as a plain folder at `dest` (which must be absent or empty).
    The tree is built in a sibling folder and renamed into place only once every chunk was
    verified, so a failed pull never leaves a half-written rootfs at `dest`. What `policy`
    left out is counted in `report`. `progress(done, total)` counts the bytes of the image's
    distinct chunks written so far, of all of them."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ConfigError(f"{dest}: pull needs a missing or empty destination folder")
    if policy.devices and os.geteuid() != 0:
        raise ConfigError("pull: creating device nodes needs root")
    report = PullReport() if report is None else report
    image = store.open_image(ref)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.partial-",
                            dir=os.path.dirname(dest))
    try:
        _materialize(store, image, work, concurrency, progress, policy, report)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if os.path.isdir(dest):
        os.rmdir(dest)
    os.rename(work, dest)
    return image


def _materialize(store: ImageStore, image: Image, dest: str, concurrency: int,
                 progress: Progress | None, policy: PullPolicy,
                 report: PullReport) -> None:
    entries = image.toc.entries
    _create_tree(dest, entries)
    targets: dict[str, list[tuple[str, int]]] = {}
    for e in entries:
        pos = 0
        for c in e.chunks:
            targets.setdefault(c.digest, []).append((os.path.join(dest, e.path), pos))
            pos += c.size
    frame_len = {d: loc.csize for d, loc in image.index.locations.items()}
    unique = image.toc.unique_chunks()
    reads = plan_ranges(unique, image.index.locations)
    counter = Counter(sum(c.size for c in unique), progress)

    def write(rr: RangeRead, data: bytes) -> int:
        n = 0
        for chunk, off in rr.chunks:
            piece = decode_chunk(data[off:off + frame_len[chunk.digest]], chunk)
            for path, pos in targets[chunk.digest]:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.pwrite(fd, piece, pos)
                finally:
                    os.close(fd)
            n += chunk.size
        return n

    async def fetch_all() -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(rr: RangeRead) -> None:
            async with sem:
                data = await store.backend.get_range(f"blobs/sha256/{rr.blob[7:]}",
                                                     rr.offset, rr.length)
                n = await asyncio.to_thread(write, rr, data)
            counter.add(n)
        await asyncio.gather(*(one(rr) for rr in reads))

    run_sync(fetch_all())
    root = os.geteuid() == 0
    for e in entries:
        p = os.path.join(dest, e.path)
        if e.type == "symlink":
            os.symlink(e.target, p)
        elif e.type == "hardlink":
            os.link(os.path.join(dest, e.target), p, follow_symlinks=False)
        elif e.type == "fifo":
            os.mkfifo(p, 0o600)
        elif e.type in ("char", "block"):
            if policy.devices:
                kind = 0o020000 if e.type == "char" else 0o060000
                os.mknod(p, kind | 0o600, os.makedev(e.devmajor, e.devminor))
            else:
                report.skipped_devices += 1
    for e in entries:
        if e.type != "dir" and (e.type not in ("char", "block") or policy.devices):
            _finish_entry(dest, e, root, policy, report)
    for e in reversed(entries):
        if e.type == "dir":
            _finish_entry(dest, e, root, policy, report)
    if report.skipped_devices or report.cleared_setid or report.dropped_capabilities:
        log.info("pull: left out %d device nodes, %d setuid/setgid bits, %d file capabilities"
                 " (PullPolicy / --keep-devices, --keep-setid)", report.skipped_devices,
                 report.cleared_setid, report.dropped_capabilities)
