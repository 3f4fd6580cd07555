"""The pure read planner of full pulls, and the throttled backend benchmarks use.
(The chunk store's tests are tests/objstore/test_chunkstore.py.)"""

from __future__ import annotations

import os
import time

from warmstart.imageformat.model import Chunk, Location
from warmstart.imageformat.pull import plan_ranges


def test_plan_ranges_coalesces_neighbours_per_blob():
    chunks = [Chunk(f"{i:064x}", 10) for i in range(5)]
    locs = {chunks[0].digest: Location("sha256:b", 0, 100),
            chunks[1].digest: Location("sha256:b", 100, 50),
            chunks[2].digest: Location("sha256:b", 5000, 10),
            chunks[3].digest: Location("sha256:a", 7, 3),
            chunks[4].digest: Location("sha256:b", 150, 20)}
    plan = plan_ranges(chunks, locs, max_gap=1000, max_len=1 << 20)
    assert [(r.blob, r.offset, r.length) for r in plan] == [
        ("sha256:a", 7, 3), ("sha256:b", 0, 170), ("sha256:b", 5000, 10)]
    assert [off for _, off in plan[1].chunks] == [0, 100, 150]
    small = plan_ranges(chunks, locs, max_gap=1000, max_len=120)
    assert len(small) == 4


def test_throttled_backend_limits_the_rate(tmp_path):
    from warmstart.imageformat._aio import run_sync
    from warmstart.imageformat.backends import LocalBackend, ThrottledBackend
    inner = LocalBackend(str(tmp_path))
    run_sync(inner.put("k", os.urandom(1 << 20)))
    slow = ThrottledBackend(inner, 4 << 20)  # 4 MiB/s

    async def four_reads():
        import asyncio
        await asyncio.gather(*(slow.get_range("k", i << 18, 1 << 18) for i in range(4)))
    t = time.monotonic()
    run_sync(four_reads())
    # 1 MiB at 4 MiB/s takes >= 0.25 s when one bucket is shared by all readers (a bucket
    # each would let the four reads through in 1/4 of that); a loaded machine only adds time
    assert time.monotonic() - t >= 0.8 * (1 << 20) / (4 << 20)
