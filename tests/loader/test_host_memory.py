"""CPU destination memory: anonymous mappings in the system's page size, never advised huge.

On VMs whose host takes back freed 2 MiB blocks, first writes into huge pages ran 4-8x slower
than into 4 KiB pages (benchmarks/RESULTS.md, 2026-12-01 22:20 UTC), so `host_tensor` must not
ask for them. Read from the kernel's own record of the mapping (`/proc/self/smaps` VmFlags:
`hg` is MADV_HUGEPAGE)."""

from __future__ import annotations

import pytest
import torch

from warmstart.loader.memory import host_tensor


def _vm_flags(addr: int) -> list[str]:
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds address {addr:#x}")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"),
                    reason="needs Linux /proc/self/smaps")
def test_destination_is_not_advised_huge():
    dest = host_tensor(8 << 20)
    flags = _vm_flags(dest.data_ptr())
    assert "hg" not in flags, flags
    dest[:] = 7  # writable, private, the bytes land
    assert int(dest[-1]) == 7 and dest.dtype == torch.uint8 and dest.numel() == 8 << 20


def test_empty_destination():
    assert host_tensor(0).numel() == 0
