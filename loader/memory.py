"""Host and device memory: destination buffers per group, and the ring of staging slots."""

from __future__ import annotations

import asyncio
import mmap
import warnings

import torch

from warmstart import _native
from warmstart.errors import NativeError
from warmstart.loader.sources.base import Target

HOST_PINNED_KIND = 2


def host_tensor(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor backed by an anonymous mapping with transparent huge pages.

    First writes into fresh 4 KiB pages run at ~0.5-1.6 GB/s on these VMs (page faults);
    with huge pages they run at ~10 GB/s. The mapping is released with the last tensor view.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        block.madvise(mmap.MADV_HUGEPAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(block, dtype=torch.uint8)


def tensor_target(tensor: torch.Tensor) -> Target:
    """The host bytes of a contiguous CPU uint8 tensor as a read target."""
    if tensor.numel() == 0:
        return Target.of(bytearray(0))
    return Target.at(tensor.data_ptr(), tensor.numel())


class HostRing:
    """`slots` reusable host buffers of `slot_bytes`, allocated once per load, handed out
    and returned through an asyncio queue. Pinned through CUDA when asked and available."""

    def __init__(self, slots: int, slot_bytes: int, pinned: bool) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.nbytes = slots * slot_bytes
        addr, kind = _native.host_alloc(self.nbytes, pinned)
        if addr == 0:
            raise NativeError(f"could not allocate a {self.nbytes}-byte host ring "
                              f"({'pinned' if pinned else 'pageable'})")
        self.addr, self.kind = addr, kind
        self.pinned = kind == HOST_PINNED_KIND
        self._free: asyncio.Queue[Target] = asyncio.Queue()
        for i in range(slots):
            self._free.put_nowait(Target.at(addr + i * slot_bytes, slot_bytes))

    async def get(self) -> Target:
        return await self._free.get()

    def put(self, slot: Target) -> None:
        self._free.put_nowait(slot)

    def free(self) -> None:
        """Only call once no read or copy can still touch the slots."""
        if self.addr:
            _native.host_free(self.addr, self.nbytes, self.kind)
            self.addr = 0
