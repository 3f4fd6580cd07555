"""Fault-injecting wrappers around any loader `Source`, for tests and benchmarks.

    FailingRange(source, start, end)                      # every read touching [start, end): EIO
    FailingRange(source, start, end, times=2, retryable=True)  # transient: fails twice, then OK
    ShortReads(source, at)                                # the file ends at `at` (shrunk on disk)
    Throttled(source, bytes_per_s)                        # one shared token bucket for reads
    Delayed(source, seconds)                              # added time before every read

The errors are the ones the real local source raises for the same condition (`SourceError`
with errno EIO and the file, offset and length in the message; `TruncatedFile` for a file
that ended early), so a load through a wrapper fails exactly as a load from a failing disk.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time

from warmstart.errors import Retryable, SourceError, TruncatedFile
from warmstart.storage.source import Source, Target


class _Wrapper(Source):
    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = inner.name
        self.backend = inner.backend
        self.alignment = inner.alignment
        self.injected = 0  # how many reads this wrapper broke
        self._lock = threading.Lock()

    async def size(self) -> int:
        return await self.inner.size()

    async def close(self) -> None:
        await self.inner.close()


class FailingRange(_Wrapper):
    """Reads overlapping [start, end) fail with EIO: forever, or the first `times` of them.
    `retryable` raises the transient kind (a flaky network file system), else the
    permanent one a failing disk gives."""

    def __init__(self, inner: Source, start: int, end: int, *, times: int | None = None,
                 retryable: bool = False) -> None:
        super().__init__(inner)
        self.start, self.end, self.times, self.retryable = start, end, times, retryable

    async def read_into(self, offset: int, target: Target) -> None:
        if offset < self.end and offset + target.nbytes > self.start:
            with self._lock:
                fire = self.times is None or self.injected < self.times
                if fire:
                    self.injected += 1
            if fire:
                kind = Retryable if self.retryable else SourceError
                raise kind(errno.EIO, f"{self.name}: read of {target.nbytes} bytes at offset "
                                      f"{offset} failed: {os.strerror(errno.EIO)}")
        await self.inner.read_into(offset, target)


class ShortReads(_Wrapper):
    """The file ends at `at`: reads past it get the bytes before `at` and then stop short,
    as pread does on a file truncated underneath the reader."""

    def __init__(self, inner: Source, at: int) -> None:
        super().__init__(inner)
        self.at = at

    async def read_into(self, offset: int, target: Target) -> None:
        end = offset + target.nbytes
        if end <= self.at:
            return await self.inner.read_into(offset, target)
        got = max(0, self.at - offset)
        if got:
            await self.inner.read_into(offset, target.sub(0, got))
        with self._lock:
            self.injected += 1
        raise TruncatedFile(f"{self.name}: file ended after {offset + got} bytes while "
                            f"reading [{offset}, {end})")


class Throttled(_Wrapper):
    """Reads share one token bucket of `bytes_per_s`: a slower network in front of any source."""

    def __init__(self, inner: Source, bytes_per_s: float, clock=time.monotonic) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s!r}")
        super().__init__(inner)
        self.rate, self._clock, self._next_free = float(bytes_per_s), clock, 0.0

    async def read_into(self, offset: int, target: Target) -> None:
        with self._lock:
            start = max(self._clock(), self._next_free)
            self._next_free = start + target.nbytes / self.rate
            wait = self._next_free - self._clock()
        await self.inner.read_into(offset, target)
        if wait > 0:
            await asyncio.sleep(wait)


class Delayed(_Wrapper):
    """`seconds` more before every read and size call: latency to first byte."""

    def __init__(self, inner: Source, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        super().__init__(inner)
        self.seconds = seconds

    async def size(self) -> int:
        await asyncio.sleep(self.seconds)
        return await self.inner.size()

    async def read_into(self, offset: int, target: Target) -> None:
        await asyncio.sleep(self.seconds)
        await self.inner.read_into(offset, target)
