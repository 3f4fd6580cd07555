"""Cancelling a load (asyncio cancel, a consumer that stops early) waits for reads in flight,
closes files and sockets, and leaves no worker threads behind."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from warmstart.loader import LoaderConfig, astream, stream, sync
from warmstart.testing.checkpoints import make_checkpoint

from settle_helpers import settled

CFG = LoaderConfig(chunk_size=64 << 10, memory_budget=4 * ((64 << 10) + 8192), concurrency=4,
                   mmap=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cancel"), 24 << 20, shards=2,
                           dtype=torch.float16)


def _snapshot():
    sync.loop()
    threads = {t.name for t in threading.enumerate()
               if not t.name.startswith(("warmstart-loop", "warmstart-aux"))}
    return threads, len(os.listdir("/proc/self/fd"))


def _settled(before):
    threads, fds = settled(_snapshot, lambda s: s[0] <= before[0] and s[1] <= before[1])
    assert threads <= before[0], f"threads left: {threads - before[0]}"
    assert fds <= before[1], "file descriptors leaked"


@pytest.mark.parametrize("staged", [False, True])
def test_consumer_stops_early(ckpt, staged):
    before = _snapshot()
    it = stream(str(ckpt), config=CFG.replace(staged=staged))
    for _ in range(3):
        next(it)
    it.close()
    _settled(before)


def test_asyncio_cancel_mid_load(ckpt):
    before = _snapshot()

    first = asyncio.Event()

    async def consume():
        async for _ in astream(str(ckpt), config=CFG.replace(staged=True)):
            first.set()
            await asyncio.Event().wait()  # mid-stream until cancelled, on any machine

    async def main():
        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _settled(before)


def _slow_reads(monkeypatch, seconds: float) -> list[int]:
    """Makes every local data read (not the header's, at offset 0) take `seconds`; returns
    [reads in flight] as it changes."""
    from warmstart.loader.sources.local import LocalFileSource

    in_flight = [0]
    read = LocalFileSource.read_blocking

    def slow(self, offset, target):
        if offset == 0:
            return read(self, offset, target)
        in_flight[0] += 1
        try:
            import time
            time.sleep(seconds)
            return read(self, offset, target)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(LocalFileSource, "read_blocking", slow)
    return in_flight


def test_cancel_in_the_tail_frees_the_ring_only_after_reads_end(ckpt, monkeypatch):
    """A cancel that lands while the pipeline waits for its last reads must not cut that wait
    short: the ring (pinned memory on a GPU) is freed only once no thread writes into it."""
    from warmstart.loader import aload
    from warmstart.loader.memory import HostRing

    in_flight = _slow_reads(monkeypatch, 0.5)
    at_free = []
    free = HostRing.free
    monkeypatch.setattr(HostRing, "free", lambda self: (at_free.append(in_flight[0]),
                                                         free(self)))
    cfg = CFG.replace(staged=True)

    async def main():
        task = asyncio.create_task(aload(str(ckpt), config=cfg))
        while not in_flight[0]:  # until reads are in flight (any machine takes > 0.5 s each)
            assert not task.done()
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert at_free == [0]


def test_a_failed_chunk_ends_a_stream_whose_window_is_full(tmp_path, monkeypatch):
    """stream() keeps two groups ahead of the consumer; when a chunk of a started group fails,
    that group never completes, and the load must still end with the error, not wait."""
    from safetensors.torch import save_file

    from warmstart.errors import SourceError
    from warmstart.loader.sources.local import LocalFileSource

    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((4096,), i, dtype=torch.uint8) for i in range(6)}, str(path))
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    read = LocalFileSource.read_into

    async def failing(self, offset, target):
        if offset >= data_start + 4096:
            raise SourceError(5, f"{self.name}: injected failure at {offset}")
        return await read(self, offset, target)

    monkeypatch.setattr(LocalFileSource, "read_into", failing)
    cfg = LoaderConfig(chunk_size=4096, group_size=4096, memory_budget=1 << 20, mmap=False,
                       max_attempts=1)

    async def main():
        return [name async for name, _ in astream(str(path), config=cfg)]

    with pytest.raises(SourceError, match="injected"):
        asyncio.run(asyncio.wait_for(main(), 30))


def test_loop_shutdown_mid_read_frees_the_ring_only_after_reads_end(ckpt, monkeypatch):
    """asyncio.run ending while reads are in flight cancels every task at once, chunk tasks
    included: a chunk must still wait for its reader thread before its slot can be freed."""
    from warmstart.loader.memory import HostRing

    in_flight = _slow_reads(monkeypatch, 0.5)
    at_free = []
    free = HostRing.free
    monkeypatch.setattr(HostRing, "free", lambda self: (at_free.append(in_flight[0]),
                                                         free(self)))

    async def consume():
        async for _ in astream(str(ckpt), config=CFG.replace(staged=True)):
            pass

    async def main():
        task = asyncio.ensure_future(consume())
        while not in_flight[0]:  # returning once reads are in flight cancels all tasks
            assert not task.done()
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert at_free == [0]
