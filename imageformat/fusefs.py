"""A read-only FUSE file system over one image (pyfuse3): metadata from the TOC, bytes on
demand through the node's chunk store (warmstart.storage.chunkstore).

Inode n+1 is TOC entry n (the root is inode 1); hard links share their target's inode.
File reads run in worker threads; a chunk that cannot be fetched or verified fails the read
with EIO and a log line naming the chunk, and the file system keeps serving everything else.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable

import pyfuse3
import trio

from warmstart.storage.chunkstore import ChunkStore

from .model import Chunk, Entry

log = logging.getLogger("warmstart.imageformat")

_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}
TIMEOUT = 3600.0  # the image never changes under a mount


class ImageFS(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, entries: tuple[Entry, ...], cache: ChunkStore,
                 fetch: Callable[[Chunk], bytes], record: bool = False,
                 threads: int = 16,
                 owner: Callable[[int, int], tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.owner = owner or (lambda uid, gid: (uid, gid))  # rootless: see idmap.py
        self.cache, self.fetch = cache, fetch
        self.limiter = trio.CapacityLimiter(threads)
        self.record_lock = threading.Lock()
        self.recorded: list[str] | None = [] if record else None
        self._seen: set[str] = set()
        self.bytes_read = 0
        self.read_calls = 0  # FUSE read requests that reached this process
        self.count_lock = threading.Lock()
        by_path = {e.path: i + 1 for i, e in enumerate(entries)}
        self.entries: dict[int, Entry] = {}
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self.parent: dict[int, int] = {1: 1}
        nlink: dict[int, int] = {}
        for i, e in enumerate(entries):
            ino = i + 1
            if e.type == "hardlink":
                ino = by_path[e.target]
            else:
                self.entries[ino] = e
            nlink[ino] = nlink.get(ino, 0) + (2 if e.type == "dir" else 1)
            if e.path != ".":
                parent = by_path[os.path.dirname(e.path) or "."]
                self.children.setdefault(parent, []).append(
                    (os.fsencode(os.path.basename(e.path)), ino))
                if e.type == "dir":
                    nlink[parent] = nlink.get(parent, 0) + 1
                    self.parent[ino] = parent
        self.nlink = nlink
        self.lookup_map = {p: dict(kids) for p, kids in self.children.items()}
        self.offsets: dict[int, list[int]] = {}
        for ino, e in self.entries.items():
            if e.type == "reg":
                pos, offs = 0, []
                for c in e.chunks:
                    offs.append(pos)
                    pos += c.size
                self.offsets[ino] = offs

    # --- metadata -------------------------------------------------------------------
    def chunk(self, chunk: Chunk) -> bytes:
        """The chunk's verified bytes, through the node's chunk store (fetched at most once)."""
        return self.cache.get_or_fetch(chunk.digest, lambda: self.fetch(chunk), chunk.size)

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        e = self.entries[ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = _TYPE_BITS[e.type] | e.mode
        a.st_nlink = self.nlink.get(ino, 1)
        a.st_uid, a.st_gid = self.owner(e.uid, e.gid)
        a.st_rdev = os.makedev(e.devmajor, e.devminor) if e.type in ("char", "block") else 0
        a.st_size = e.size if e.type == "reg" else (
            len(os.fsencode(e.target)) if e.type == "symlink" else 0)
        a.st_blksize = 1 << 17
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in self.entries:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = self.parent.get(parent_inode, 1)
        else:
            ino = self.lookup_map.get(parent_inode, {}).get(name)
        if ino is None or ino not in self.entries:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(ino)

    async def readlink(self, inode, ctx):
        e = self.entries[inode]
        if e.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(e.target)

    async def opendir(self, inode, ctx):
        if self.entries.get(inode) is None or self.entries[inode].type != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        kids = [(b".", fh), (b"..", self.parent.get(fh, 1))] + self.children.get(fh, [])
        for i in range(start_id, len(kids)):
            name, ino = kids[i]
            if not pyfuse3.readdir_reply(token, name, self.attrs(ino), i + 1):
                break

    async def getxattr(self, inode, name, ctx):
        for k, v in self.entries[inode].xattrs:
            if os.fsencode(k) == name:
                return v
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return [os.fsencode(k) for k, _ in self.entries[inode].xattrs]

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(e.size for e in self.entries.values()) // 4096 + 1
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.entries)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- data -----------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.entries.get(inode) is None or self.entries[inode].type != "reg":
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return await trio.to_thread.run_sync(self.read_sync, fh, off, size,
                                             limiter=self.limiter)

    def read_sync(self, ino: int, off: int, size: int) -> bytes:
        e = self.entries[ino]
        end = min(off + size, e.size)
        if off >= end:
            return b""
        offs = self.offsets[ino]
        i = bisect.bisect_right(offs, off) - 1
        out = []
        while i < len(e.chunks) and offs[i] < end:
            chunk = e.chunks[i]
            self.note(chunk.digest)
            try:
                data = self.chunk(chunk)
            except Exception as exc:  # noqa: BLE001 - every failure becomes EIO
                log.error("EIO reading %s at %d: chunk %s could not be fetched: %s",
                          e.path, off, chunk.digest, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            lo = max(off - offs[i], 0)
            hi = min(end - offs[i], chunk.size)
            out.append(data[lo:hi])
            i += 1
        result = b"".join(out)
        with self.count_lock:
            self.read_calls += 1
            self.bytes_read += len(result)
        return result

    def note(self, digest: str) -> None:
        if self.recorded is not None and digest not in self._seen:
            with self.record_lock:
                if digest not in self._seen:
                    self._seen.add(digest)
                    self.recorded.append(digest)
