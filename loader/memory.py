"""Host and device memory: destination buffers per group, and the ring of staging slots."""

from __future__ import annotations

import asyncio
import mmap
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol

import torch

from warmstart import _native
from warmstart.errors import NativeError
from warmstart.loader.sources.base import Target

HOST_PINNED_KIND = 2


def host_tensor(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor backed by an anonymous mapping, in the system's default page size
    (no `MADV_HUGEPAGE`). The mapping is released with the last tensor view.

    A fresh process writes every destination byte for the first time, so the first-touch cost
    of new memory is part of every load. On these VMs the host takes back guest memory freed in
    2 MiB blocks (free page reporting, order 9) a few seconds after it is freed; a huge page is
    such a block, and faulting one in then ran at 0.3-0.7 GB/s with 1-4 threads, against
    2.4-3.1 GB/s for 4 KiB pages (benchmarks/RESULTS.md, 2026-12-01 22:20 UTC). Huge pages win
    (4-6 GB/s) only right after another process freed memory the host had not yet taken back.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(block, dtype=torch.uint8)


class DeviceMemory(Protocol):
    """Where a load to cuda:N gets its destination memory and the consumer's stream.

    `TorchCudaMemory` (the default) is torch's caching allocator and torch's current stream.
    Tests of the CUDA path on machines without a GPU pass another one (host memory, streams
    of the CUDA runtime double); nothing else in the loader knows the difference."""

    def device_count(self) -> int: ...

    def current_device(self) -> int: ...

    def current_stream(self, device: int) -> Any:
        """The calling thread's current stream on `device` (opaque to the loader)."""

    def stream_handle(self, stream: Any) -> int:
        """Its cudaStream_t, as an int."""

    def alloc(self, device: int, nbytes: int, stream: Any) -> torch.Tensor:
        """`nbytes` of uint8 device memory, allocated for use on `stream`."""

    def on_stream(self, stream: Any) -> ContextManager:
        """Torch operations inside run on `stream` (the tensors' casts)."""


class TorchCudaMemory:
    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def current_stream(self, device: int) -> Any:
        return torch.cuda.current_stream(device)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def alloc(self, device: int, nbytes: int, stream: Any) -> torch.Tensor:
        # The caching allocator ties the block to `stream`: freed by the consumer, it is
        # reused only in that stream's order. Work still queued there on the block's previous
        # life is waited for by the copy stream (CudaCopyEngine.wait_for) before any copy.
        with torch.cuda.stream(stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", device))

    def on_stream(self, stream: Any) -> ContextManager:
        return torch.cuda.stream(stream)


def tensor_target(tensor: torch.Tensor) -> Target:
    """The host bytes of a contiguous CPU uint8 tensor as a read target."""
    if tensor.numel() == 0:
        return Target.of(bytearray(0))
    return Target.at(tensor.data_ptr(), tensor.numel())


@dataclass(frozen=True)
class HostBlock:
    """One host allocation of the native core: pinned (cudaHostAlloc) or an anonymous
    mapping. `device` is the GPU that was current when it was pinned."""

    addr: int
    nbytes: int
    kind: int
    device: int = 0

    @property
    def pinned(self) -> bool:
        return self.kind == HOST_PINNED_KIND

    def free(self) -> None:
        """For a pinned block, call it on a thread whose device may change (the copy
        engine's): freeing makes the block's device current."""
        _native.host_free(self.addr, self.nbytes, self.kind, self.device)


def pageable_block(nbytes: int) -> HostBlock:
    addr, kind, _ = _native.host_alloc(nbytes, False)
    if addr == 0:
        raise NativeError(f"could not allocate {nbytes} bytes of host memory for the ring")
    return HostBlock(addr, nbytes, kind)


def pinned_block(nbytes: int, device: int) -> tuple[HostBlock | None, int]:
    """(block, 0), or (None, cudaError_t). Call on a thread whose device may change."""
    addr, kind, err = _native.host_alloc(nbytes, True, device)
    if addr == 0:
        return None, err or -1
    return HostBlock(addr, nbytes, kind, device), 0


class PinnedCache:
    """Pinned memory kept between loads of one process: pinning a few hundred MiB costs
    tens to hundreds of milliseconds, more than a small load. At most one block stays idle
    (the largest seen), so what a process holds while no load runs is bounded by one load's
    ring; loads running at the same time each pin their own and give it back at the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: HostBlock | None = None

    def take(self, nbytes: int) -> HostBlock | None:
        with self._lock:
            block = self._idle
            if block is None or block.nbytes < nbytes:
                return None
            self._idle = None
            return block

    def give(self, block: HostBlock) -> HostBlock | None:
        """Keeps `block` idle; returns the block to free now (the smaller one), if any."""
        with self._lock:
            if self._idle is None or self._idle.nbytes < block.nbytes:
                self._idle, block = block, self._idle
            return block

    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle.nbytes if self._idle is not None else 0

    def release(self) -> None:
        """Frees the idle block (on a thread of its own, its device current there)."""
        with self._lock:
            block, self._idle = self._idle, None
        if block is not None:
            worker = threading.Thread(target=block.free, name="warmstart-unpin")
            worker.start()
            worker.join()


PINNED = PinnedCache()


def pinned_ring_block(slots: int, slot_bytes: int, device: int
                      ) -> tuple[HostBlock, int, str | None]:
    """Host memory for a ring of `slots` slots to copy to cuda:`device`, pinned: the process's
    idle block when it is large enough, else a new one; on failure halves the slots (down to
    two), then falls back to pageable memory. Returns (block, slots, a warning or None).
    Call on a thread whose device may change (the copy engine's)."""
    n, first_error = slots, ""
    while True:
        nbytes = n * slot_bytes
        block = PINNED.take(nbytes)
        if block is None:
            block, err = pinned_block(nbytes, device)
            if block is None and not first_error:
                first_error = (f"cudaHostAlloc of {nbytes} bytes for cuda:{device} failed: "
                               f"{_native.cuda_error_string(err)} (cudaError {err})")
        if block is not None:
            warning = None if n == slots else (
                f"pinned host memory: {first_error}; staging through {n} pinned slots "
                f"instead of {slots}")
            return block, n, warning
        if n <= 2:
            break
        n = max(2, n // 2)
    return pageable_block(slots * slot_bytes), slots, (
        f"pinned host memory: {first_error}; staging through pageable memory instead "
        f"(host-to-device copies will be slower)")


class HostRing:
    """`slots` reusable host buffers of `slot_bytes` carved from one block, handed out and
    returned through an asyncio queue. `free()` hands the block to `release` (by default it
    is freed); only call it once no read or copy can still touch the slots."""

    def __init__(self, block: HostBlock, slots: int, slot_bytes: int,
                 release: Callable[[HostBlock], None] | None = None) -> None:
        assert slots * slot_bytes <= block.nbytes
        self.block = block
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.nbytes = slots * slot_bytes
        self.addr = block.addr
        self.pinned = block.pinned
        self._release = release or HostBlock.free
        self._free: asyncio.Queue[Target] = asyncio.Queue()
        for i in range(slots):
            self._free.put_nowait(Target.at(block.addr + i * slot_bytes, slot_bytes))

    @classmethod
    def pageable(cls, slots: int, slot_bytes: int) -> "HostRing":
        return cls(pageable_block(slots * slot_bytes), slots, slot_bytes)

    async def get(self) -> Target:
        return await self._free.get()

    def put(self, slot: Target) -> None:
        self._free.put_nowait(slot)

    def free(self) -> None:
        if self.addr:
            self.addr = 0
            self._release(self.block)
