"""Split file content into content-defined chunks and name each by its sha256.

The cut points come from the native FastCDC loop (`csrc/chunker.cpp`); this module feeds it
a stream in windows and carries the unfinished tail over. `reference_cuts` is the same
algorithm in pure Python, kept for tests only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import BinaryIO

from warmstart import _native

from .model import Chunking

WINDOW = 8 << 20


def iter_chunks(f: BinaryIO, size: int, params: Chunking) -> Iterator[tuple[str, bytes]]:
    """Yields (sha256 hex, bytes) for each chunk of the next `size` bytes of `f`."""
    pending = b""
    left = size
    while left > 0 or pending:
        want = min(left, max(WINDOW, params.max * 2))
        data = f.read(want) if want else b""
        if len(data) != want:
            raise EOFError(f"expected {want} more bytes, got {len(data)}")
        left -= want
        buf = pending + data if pending else data
        final = left == 0
        lengths = _native.fastcdc_cuts(buf, params.min, params.avg, params.max, final)
        pos = 0
        view = memoryview(buf)
        for n in lengths:
            piece = bytes(view[pos:pos + n])
            pos += n
            yield hashlib.sha256(piece).hexdigest(), piece
        pending = bytes(view[pos:]) if pos < len(buf) else b""
        if final and pending:
            raise AssertionError("chunker left bytes behind at the end of a file")


def reference_cuts(data: bytes, mn: int, avg: int, mx: int) -> list[int]:
    """Pure-Python FastCDC with the same gear table and masks as the native loop."""
    gear = _native.gear_table()
    bits = max(avg.bit_length() - 1, 0)

    def top(k: int) -> int:
        return 0 if k <= 0 else ((1 << 64) - 1) ^ ((1 << (64 - min(k, 64))) - 1)

    mask_s, mask_l, full = top(bits + 2), top(bits - 2), (1 << 64) - 1
    out, pos, n = [], 0, len(data)
    while pos < n:
        r = n - pos
        if r <= mn:
            out.append(r)
            break
        end = min(r, mx)
        normal = min(avg, end)
        h, cut, i = 0, 0, mn
        while i < normal:
            h = ((h << 1) + gear[data[pos + i]]) & full
            if h & mask_s == 0:
                cut = i + 1
                break
            i += 1
        if not cut:
            while i < end:
                h = ((h << 1) + gear[data[pos + i]]) & full
                if h & mask_l == 0:
                    cut = i + 1
                    break
                i += 1
        cut = cut or end
        out.append(cut)
        pos += cut
    return out
