"""Local files: positional reads by the native core on worker threads (GIL released)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from concurrent.futures import Executor

from warmstart import _native
from warmstart.errors import AccessDenied, NotFound, SourceError, TruncatedFile
from warmstart.loader.sources.base import Source, Target, in_thread

DIRECT_ALIGNMENT = 4096
AUTO_DIRECT_MIN_BYTES = 64 << 20  # small files: not worth a ring
CACHE_SAMPLE_PAGES = 1024


def open_error(path: str, exc: OSError) -> SourceError:
    if isinstance(exc, FileNotFoundError):
        return NotFound(errno.ENOENT, f"{path}: no such file")
    if isinstance(exc, PermissionError):
        return AccessDenied(errno.EACCES, f"{path}: permission denied")
    return SourceError(exc.errno or errno.EIO, f"{path}: cannot open ({exc.strerror or exc})")


class LocalFileSource(Source):
    backend = "local"

    def __init__(self, path: str, executor: Executor, *, direct: bool | None = False) -> None:
        self.name = path
        self._executor = executor
        self._fd = self._direct_fd = -1
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            if direct is None:  # auto: O_DIRECT only pays off when the data is not cached
                size = os.fstat(self._fd).st_size
                direct = size >= AUTO_DIRECT_MIN_BYTES and 0 <= self.cached_share() < 0.5
            self.alignment = DIRECT_ALIGNMENT if direct else 1
            if direct:  # aligned reads bypass the page cache; unaligned ones (headers) do not
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except IsADirectoryError:
            self._close_fds()
            raise SourceError(errno.EISDIR, f"{path}: is a directory") from None
        except OSError as exc:
            self._close_fds()
            raise open_error(path, exc) from None
        self._size = os.fstat(self._fd).st_size

    async def size(self) -> int:
        return self._size

    @property
    def direct(self) -> bool:
        return self._direct_fd >= 0

    def cached_share(self) -> float:
        """Share of (sampled) pages of the file in the page cache; -1 when unknown."""
        size = os.fstat(self._fd).st_size
        return _native.cached_fraction(self._fd, size, CACHE_SAMPLE_PAGES) if size else 1.0

    def map_private(self, start: int, end: int) -> "FileMapping":
        """Bytes [start, end) (widened to whole pages), mapped private and copy-on-write:
        writes never reach the file."""
        return FileMapping(self.name, self._fd, start, end)

    def current_size(self) -> int:
        return os.fstat(self._fd).st_size

    def _aligned(self, offset: int, target: Target) -> bool:
        a = DIRECT_ALIGNMENT
        return self._direct_fd >= 0 and not (offset % a or target.addr % a or target.nbytes % a)

    def read_blocking(self, offset: int, target: Target) -> None:
        """`read_into` for a worker thread of the caller's (blocking, GIL released)."""
        fd = self._direct_fd if self._aligned(offset, target) else self._fd
        n = _native.pread_into(fd, offset, target.addr, target.nbytes)
        if n < 0:
            code = -n
            raise SourceError(code, f"{self.name}: read of {target.nbytes} bytes at offset "
                                    f"{offset} failed: {os.strerror(code)}")
        if n < min(target.nbytes, self._size - offset):  # short before the end of file
            raise TruncatedFile(f"{self.name}: file ended after {offset + n} bytes while "
                                f"reading [{offset}, {offset + target.nbytes})")

    async def read_into(self, offset: int, target: Target) -> None:
        if target.nbytes == 0:
            return
        await in_thread(self._executor, self.read_blocking, offset, target)

    def _close_fds(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    async def close(self) -> None:
        self._close_fds()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FAILED = ctypes.c_void_p(-1).value
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+
POPULATE_STEP = 16 << 20  # made resident, then touched, per step (a multiple of the page)


class FileMapping:
    """File bytes [start, end) mapped private and copy-on-write from the page boundary at or
    below `start` (`offset` = file offset of `buffer[0]`), unmapped once `buffer` and every
    tensor made from it are gone. It holds no file descriptor."""

    def __init__(self, name: str, fd: int, start: int, end: int) -> None:
        self.name = name
        self.offset = start - start % mmap.PAGESIZE
        self.end = end
        length = max(end - self.offset, 1)
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE,
                          fd, self.offset)
        if addr in (None, _MAP_FAILED):
            code = ctypes.get_errno() or errno.ENOMEM
            raise SourceError(code, f"{name}: cannot map bytes [{start}, {end}) "
                                    f"({os.strerror(code)})")
        self.addr = addr
        self.buffer = (ctypes.c_ubyte * length).from_address(addr)
        weakref.finalize(self.buffer, _libc.munmap, addr, length)

    def populate(self, start: int = 0, length: int | None = None) -> None:
        """Makes mapped bytes [start, start + length) resident (all by default; `start` a
        multiple of the page size), reading from disk what is not cached, with the GIL
        released, and reads one byte per page; a file cut short before its bytes were made
        resident is a TruncatedFile, not a SIGBUS (one cut in the instant between a step's
        populate and its touch faults as any mapping does once handed over)."""
        if length is None:
            length = len(self.buffer) - start
        # In steps, each made resident and then read one byte per page on this thread: on
        # these VMs the first CPU access to a page the virtual disk filled costs about as much
        # as reading it (0.5-1.1 s per GB, host-side faults), and paid here it overlaps the
        # other threads' reads instead of falling on the consumer, one page at a time, after
        # the load returned (benchmarks/RESULTS.md, 2026-12-01 23:15 UTC).
        for at in range(start, start + length, POPULATE_STEP):
            step = min(POPULATE_STEP, start + length - at)
            self._populate(at, step)
            _native.touch_pages(self.addr + at, step, mmap.PAGESIZE)

    def _populate(self, start: int, length: int) -> None:
        if _libc.madvise(self.addr + start, length, MADV_POPULATE_READ) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EINVAL:  # an older kernel: the touch that follows reads the pages in
            return
        if code == errno.EFAULT:
            raise TruncatedFile(f"{self.name}: the file shrank below {self.end} bytes while "
                                f"it was being loaded")
        else:
            raise SourceError(code or errno.EIO, f"{self.name}: reading bytes "
                                                 f"[{self.offset}, {self.end}) failed: "
                                                 f"{os.strerror(code or errno.EIO)}")
