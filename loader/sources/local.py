"""Local files: positional reads by the native core on worker threads (GIL released)."""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import Executor

from warmstart import _native
from warmstart.errors import AccessDenied, NotFound, SourceError, TruncatedFile
from warmstart.loader.sources.base import Source, Target

DIRECT_ALIGNMENT = 4096
AUTO_DIRECT_MIN_BYTES = 64 << 20  # small files: not worth a ring


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
                direct = size >= AUTO_DIRECT_MIN_BYTES and 0 <= _native.cached_fraction(
                    self._fd, size, 1024) < 0.5
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

    def _aligned(self, offset: int, target: Target) -> bool:
        a = DIRECT_ALIGNMENT
        return self._direct_fd >= 0 and not (offset % a or target.addr % a or target.nbytes % a)

    def _read_blocking(self, offset: int, target: Target) -> None:
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
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._read_blocking, offset, target)

    def _close_fds(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    async def close(self) -> None:
        self._close_fds()
