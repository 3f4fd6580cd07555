"""GPU defaults from a model of the host: readers, chunk size and ring slots for a staged load
of local files to a GPU (the native copy loop). Pure: `HostFacts.here()` is the only part that
looks at the machine.

The model (docs/CONFIG.md, "GPU defaults"):
  rate     = min(PCIe host-to-device rate, storage rate): what the load can reach at best.
  readers  = enough threads that `readers * per-thread read rate >= rate`, at least 2, and
             at most the cores less two (one for the copy loop's reaper, one for Python).
  chunk    = big enough that the fixed cost of a chunk (syscalls, cudaMemcpyAsync, its event,
             the recycle) is at most `OVERHEAD_SHARE` of the chunk's transfer time at `rate`,
             and small enough that the ring holds a slot per reader plus `COPY_DEPTH` slots
             queued on the copy stream; a multiple of 4 MiB when it is that large.
  ring     = the memory budget; but when the ring that gives is larger than the pinned block
             this process already holds idle, and that block still holds the depth with
             chunks of at least 4 MiB, the idle block (reusing it avoids pinning anew, which
             costs tens to hundreds of milliseconds).
  slots    = ring // slot size, at most twice the depth (more only pins memory that waits
             for the reads), at least 2; the load uses at most one per chunk it has.
An explicit `chunk_size` or `concurrency` in the config is kept as given; the budget is
never exceeded but by the floor of two slots (a budget smaller than two slots of one
alignment unit plus margin gets two: with verify's 1 MiB blocks, 6 MiB).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from warmstart.loader.config import MiB, SLOT_MARGIN, LoaderConfig

COPY_DEPTH = 2  # slots queued on the copy stream beyond the ones being read
OVERHEAD_SHARE = 0.05
MAX_CHUNK = 64 * MiB
MIN_USEFUL_CHUNK = 4 * MiB  # below this a reused pinned block is not worth keeping


@dataclass(frozen=True)
class HostFacts:
    """What the model knows of the host. Rates in GB/s (10^9 bytes per second)."""

    cores: int
    pinned_idle: int = 0
    """Bytes of pinned ring this process holds idle from an earlier load."""
    pcie_gbps: float = 55.0
    """Pinned host-to-device copy rate: PCIe Gen5 x16 (an H200 host) measures about 55."""
    storage_gbps: float = 60.0
    """Rate of the file reads: page cache (tens of GB/s) or the local NVMe array."""
    read_gbps_per_thread: float = 7.0
    """One thread's pread into pinned memory (a kernel copy out of the page cache)."""
    chunk_overhead_us: float = 30.0
    """Fixed cost per chunk: pread and CUDA calls, the event, the slot's recycle."""

    @classmethod
    def here(cls, pinned_idle: int = 0) -> "HostFacts":
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 2
        return cls(cores=cores, pinned_idle=pinned_idle)


@dataclass(frozen=True)
class GpuDefaults:
    readers: int
    chunk_size: int
    slot_bytes: int
    ring_bytes: int
    slots: int
    rate_gbps: float


def _round_chunk(nbytes: int, unit: int) -> int:
    """Down to a multiple of 4 MiB when that large, else of 4 KiB; always of `unit`."""
    step = math.lcm(4 * MiB if nbytes >= 4 * MiB else 4096, unit)
    return max(step, nbytes // step * step)


def gpu_defaults(facts: HostFacts, config: LoaderConfig, *, unit: int = 1) -> GpuDefaults:
    """Readers, chunk size and ring for a GPU load of local files on `facts`' host.

    `unit`: the reads' alignment (O_DIRECT pages, verify's blocks); chunks are multiples of
    it. (The load then uses at most one slot per chunk it has.)"""
    unit = max(unit, 1)
    rate = min(facts.pcie_gbps, facts.storage_gbps)
    if config.concurrency:
        readers = config.concurrency
    else:
        readers = max(2, min(math.ceil(rate / facts.read_gbps_per_thread), facts.cores - 2))
    best = _fit(facts, config, unit, rate, readers, config.memory_budget)
    idle = facts.pinned_idle
    if best.ring_bytes > idle > 0:  # a smaller pinned block is idle: use it if it holds
        reuse = _fit(facts, config, unit, rate, readers, idle)  # the depth
        if reuse.chunk_size >= min(MIN_USEFUL_CHUNK, best.chunk_size) and \
                reuse.slots >= min(readers + COPY_DEPTH, best.slots) and \
                reuse.ring_bytes <= idle:
            return reuse
    return best


def _fit(facts: HostFacts, config: LoaderConfig, unit: int, rate: float, readers: int,
         ring: int) -> GpuDefaults:
    """Chunk size and slots for a ring of at most `ring` bytes (see the module's model)."""
    margin = 2 * max(4096, unit)  # a slot holds a chunk widened to the alignment on both ends
    depth = readers + COPY_DEPTH
    if getattr(config, "_auto_chunk", False):
        by_overhead = int(facts.chunk_overhead_us * 1e-6 * rate * 1e9 / OVERHEAD_SHARE)
        chunk = min(by_overhead, MAX_CHUNK, ring // depth - margin)
        if chunk < math.lcm(4096, unit):  # the depth does not fit: two slots, readers wait
            chunk = min(by_overhead, ring // 2 - margin)
        chunk = _round_chunk(chunk, unit)
    else:
        chunk = -(-config.chunk_size // unit) * unit
    slot = chunk + margin
    slots = max(2, min(ring // slot, 2 * depth))
    return GpuDefaults(readers=readers, chunk_size=chunk, slot_bytes=slot,
                       ring_bytes=slots * slot, slots=slots, rate_gbps=rate)
