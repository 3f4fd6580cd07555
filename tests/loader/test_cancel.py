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

CFG = LoaderConfig(chunk_size=64 << 10, memory_budget=4 * ((64 << 10) + 8192), concurrency=4)


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
    threads, fds = _snapshot()
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

    async def consume():
        async for _ in astream(str(ckpt), config=CFG.replace(staged=True)):
            await asyncio.sleep(0.01)

    async def main():
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _settled(before)
