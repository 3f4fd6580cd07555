"""The storage interface: a `Source` is one readable object (a file, an S3 object, a URL).

A source needs little more than `size()` and `read_into(offset, target)`; retries, throttling
and fault injection are wrappers around any source. Reads land in a `Target`: a writable span
of host memory known both by address (for native calls) and as a memoryview (for sockets).
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """`nbytes` of writable host memory at `addr`; `view` is the same bytes as a memoryview."""

    addr: int
    view: memoryview

    @property
    def nbytes(self) -> int:
        return len(self.view)

    @classmethod
    def at(cls, addr: int, nbytes: int) -> "Target":
        array = (ctypes.c_ubyte * nbytes).from_address(addr)
        return cls(addr=addr, view=memoryview(array).cast("B"))

    @classmethod
    def of(cls, buffer) -> "Target":
        """A target over a writable buffer object (bytearray, mmap, numpy array)."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("target buffer must be writable")
        if len(view) == 0:
            return cls(addr=0, view=view)
        return cls(addr=ctypes.addressof(ctypes.c_char.from_buffer(view)), view=view)

    def sub(self, start: int, nbytes: int) -> "Target":
        return Target(addr=self.addr + start, view=self.view[start:start + nbytes])


async def in_thread(executor, fn, *args):
    """`fn(*args)` on `executor`, awaited so that a cancellation never abandons the thread:
    the caller's buffers stay in use until `fn` returns, so on cancel this still waits for it
    (bounded by the read timeout) and only then re-raises the cancellation."""
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:
                pass
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


class Source(abc.ABC):
    """One readable object. `name` is what error messages show (a path or an s3:// URI)."""

    name: str
    backend: str = "local"
    alignment: int = 1
    """Offsets, lengths and addresses of reads must be multiples of this (O_DIRECT)."""

    @abc.abstractmethod
    async def size(self) -> int: ...

    @abc.abstractmethod
    async def read_into(self, offset: int, target: Target) -> None:
        """Fills `target` with the bytes at [offset, offset + target.nbytes) or raises."""

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if length:
            await self.read_into(offset, Target.of(buf))
        return bytes(buf)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
