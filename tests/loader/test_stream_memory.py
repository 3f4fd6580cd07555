"""What a load holds, measured: `stream()` keeps at most `STREAM_GROUPS` groups of destination
memory for a consumer that keeps only its latest tensor, and a stream left early or a load that
failed holds nothing once control is back with the caller: at once, with the cyclic GC off,
also while the caller keeps the error."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import weakref

import numpy as np
import pytest
import torch

from warmstart.errors import SourceError
from warmstart.loader import LoaderConfig, astream, load, stream
from warmstart.loader.api import STREAM_GROUPS
from warmstart.loader.memory import HostRing
from warmstart.loader.sources.local import LocalFileSource
from warmstart.testing import faultproxy as fp
from warmstart.testing.checkpoints import make_checkpoint

GROUP = 256 << 10
CHUNK = 64 << 10
BASE = LoaderConfig(chunk_size=CHUNK, memory_budget=4 * (CHUNK + 8192), group_size=GROUP,
                    concurrency=4)
PATHS = {"direct": BASE.replace(mmap=False), "staged": BASE.replace(mmap=False, staged=True),
         "mapped": BASE.replace(mmap=True)}


class Meter:
    """Bytes of destination memory alive (finalizers see the last view go) and their peak:
    group buffers for the copying paths, the files' mappings for the mapped one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = self.peak = self.biggest = 0

    def watch(self, owner: object, nbytes: int) -> None:
        with self._lock:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.biggest = max(self.biggest, nbytes)
        weakref.finalize(owner, self._gone, nbytes)

    def _gone(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes


@pytest.fixture
def meter(monkeypatch):
    """Every destination buffer and file mapping of the loads in the test, metered."""
    import warmstart.loader.api as api

    meter = Meter()

    def host_tensor(nbytes: int) -> torch.Tensor:
        backing = np.empty(nbytes, dtype=np.uint8)  # numpy: a finalizer sees the last view
        meter.watch(backing, nbytes)
        return torch.from_numpy(backing)

    map_private = LocalFileSource.map_private

    def metered_map(self, start, end):
        mapping = map_private(self, start, end)
        meter.watch(mapping.buffer, len(mapping.buffer))
        return mapping

    monkeypatch.setattr(api, "host_tensor", host_tensor)
    monkeypatch.setattr(LocalFileSource, "map_private", metered_map)
    return meter


@pytest.fixture
def rings(monkeypatch):
    """[ring, freed?] of every host ring built by the loads in the test."""
    made: list[list] = []
    init, free = HostRing.__init__, HostRing.free

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append([self, False])

    def tracked_free(self):
        for entry in made:
            if entry[0] is self:
                entry[1] = True
        free(self)

    monkeypatch.setattr(HostRing, "__init__", tracked_init)
    monkeypatch.setattr(HostRing, "free", tracked_free)
    return made


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("memory"), 6 << 20, shards=2,
                           dtype=torch.float16)


@pytest.fixture
def no_gc():
    """The cyclic GC off: what is freed here is freed by reference counting, at once."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_stream_holds_at_most_stream_groups(ckpt, meter, path):
    want = load(str(ckpt), config=PATHS[path])
    total = sum(t.numel() * t.element_size() for t in want.values())
    del want
    meter.peak = meter.biggest = 0
    got = {}
    for name, tensor in stream(str(ckpt), config=PATHS[path]):
        got[name] = tensor.clone()  # copied away, as vLLM's weight loaders do
    del tensor
    assert len(got) > 0 and meter.biggest > 0
    assert total > (STREAM_GROUPS + 1) * meter.biggest  # so the bound means something
    assert meter.biggest < meter.peak <= STREAM_GROUPS * meter.biggest
    assert meter.live == 0


@pytest.mark.parametrize("path", sorted(PATHS))
def test_break_out_of_stream_frees_ring_and_groups_at_once(ckpt, meter, rings, no_gc, path):
    for i, (name, tensor) in enumerate(stream(str(ckpt), config=PATHS[path])):
        if i == 3:
            break
    del tensor
    assert meter.peak > 0
    assert meter.live == 0, "group memory kept after the consumer left the stream"
    assert all(freed for _, freed in rings), "the ring outlived the stream"
    if path == "staged":
        assert len(rings) == 1


def test_async_stream_closed_early_frees_ring_and_groups_at_once(ckpt, meter, rings, no_gc):
    async def main():
        async with contextlib.aclosing(astream(str(ckpt), config=PATHS["staged"])) as tensors:
            async for i, _ in _enumerate(tensors):
                if i == 3:
                    break

    asyncio.run(main())
    assert meter.peak > 0 and meter.live == 0
    assert len(rings) == 1 and rings[0][1]


async def _enumerate(items):
    i = 0
    async for item in items:
        yield i, item
        i += 1


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_a_failed_load_holds_nothing_while_the_error_is_kept(ckpt, meter, rings, no_gc,
                                                             monkeypatch, path):
    read = LocalFileSource.read_into
    seen = []

    async def failing(self, offset, target):
        if offset > 0:
            seen.append(offset)
            if len(seen) == 12:  # some groups exist, some tensors have landed
                raise SourceError(5, f"{self.name}: injected failure at {offset}")
        return await read(self, offset, target)

    monkeypatch.setattr(LocalFileSource, "read_into", failing)
    with pytest.raises(SourceError, match="injected") as info:
        load(str(ckpt), config=PATHS[path].replace(max_attempts=1))
    assert info.value.__traceback__ is not None  # the error, with its frames, is still here
    assert meter.peak > 0
    assert meter.live == 0, "the kept error holds the load's memory"
    assert all(freed for _, freed in rings)


@pytest.fixture(scope="module")
def s3_ckpt(localbucket, ckpt):
    localbucket.create_bucket("memory")
    localbucket.upload_tree(ckpt, "memory", "m")
    return "s3://memory/m/"


def test_async_stream_from_s3_left_by_return_frees_ring_and_groups_at_once(
        s3_ckpt, localbucket, meter, rings, no_gc, monkeypatch):
    """`return` inside `async for` over a staged S3 stream whose reads are in flight, no
    aclosing: asyncio.run cancels the pipeline and closes the abandoned generator, and once
    it is back nothing of the stream's memory is left, with no collection."""
    with fp.FaultProxy(localbucket.endpoint) as proxy:
        proxy.add_rule(fp.latency(0.01), ranged=True)  # reads still in flight at the return
        for key, value in {**localbucket.env(), "AWS_ENDPOINT_URL": proxy.endpoint}.items():
            monkeypatch.setenv(key, value)
        # groups of many chunks: the stream is left with the rest of its group still reading
        cfg = PATHS["staged"].replace(s3_data_path="raw", group_size=8 * GROUP)

        async def main():
            got = 0
            async for _, tensor in astream(s3_ckpt, config=cfg):
                got += tensor.numel() * tensor.element_size()
                del tensor
                return got

        assert asyncio.run(main()) > 0
    assert not proxy.errors, proxy.errors
    assert meter.peak > 0
    assert meter.live == 0, "group memory kept after the consumer left the stream"
    assert len(rings) == 1 and rings[0][1], "the ring outlived the stream"
