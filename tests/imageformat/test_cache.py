"""The chunk cache: single flight, eviction bound, corrupt files refetched, verified only;
and the pure read planner of full pulls."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from warmstart.errors import DigestMismatch
from warmstart.imageformat.cache import ChunkCache
from warmstart.imageformat.model import Chunk, Location
from warmstart.imageformat.pull import plan_ranges

from settle_helpers import wait_until


def chunk_of(data: bytes) -> Chunk:
    return Chunk(hashlib.sha256(data).hexdigest(), len(data))


def wait_for_waiters(cache: ChunkCache, n: int) -> None:
    """Blocks a fetch until `n` other readers have joined its flight, however slowly the
    machine starts their threads."""
    wait_until(lambda: cache.stats.waits >= n, f"{n} readers joined the fetch")


def test_single_flight_fetches_once_for_many_readers(tmp_path):
    cache = ChunkCache(str(tmp_path))
    data = os.urandom(100_000)
    c = chunk_of(data)
    calls = []

    def slow_fetch(chunk):
        calls.append(chunk.digest)
        wait_for_waiters(cache, 7)  # the fetch is in flight until every other reader waits
        return data

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(c, slow_fetch)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert calls == [c.digest] and results == [data] * 8
    assert cache.stats.waits == 7 and cache.stats.fetched_bytes == len(data)


def test_failed_fetch_reaches_every_waiter_and_is_not_cached(tmp_path):
    cache = ChunkCache(str(tmp_path))
    c = chunk_of(b"abc")
    calls = []

    def boom(chunk):
        calls.append(chunk.digest)
        wait_for_waiters(cache, 3)
        raise ConnectionError("store down")

    errors = []

    def reader():
        try:
            cache.get(c, boom)
        except ConnectionError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(errors) == 4 and calls == [c.digest]  # one fetch, its error seen by all four
    assert cache.get(c, lambda ch: b"abc") == b"abc"  # the next try fetches again


def test_wrong_bytes_from_fetch_are_never_cached(tmp_path):
    cache = ChunkCache(str(tmp_path))
    with pytest.raises(DigestMismatch, match="do not match"):
        cache.get(chunk_of(b"good"), lambda ch: b"evil")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_eviction_keeps_disk_under_the_bound(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=350_000, memory_bytes=0)
    blobs = [os.urandom(100_000) for _ in range(6)]
    for b in blobs:
        cache.get(chunk_of(b), lambda ch, b=b: b)
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk <= 350_000 and cache.stats.evicted == 3
    again = ChunkCache(str(tmp_path), max_bytes=150_000)  # a restart enforces a new bound
    assert again.disk_bytes <= 150_000


def test_corrupt_cache_file_is_refetched(tmp_path):
    data = os.urandom(5000)
    c = chunk_of(data)
    ChunkCache(str(tmp_path)).get(c, lambda ch: data)
    path = ChunkCache(str(tmp_path)).path(c.digest)
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    fresh = ChunkCache(str(tmp_path))
    calls = []
    assert fresh.get(c, lambda ch: calls.append(1) or data) == data
    assert calls == [1]


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
