"""The loader on local files that fail: EIO on a byte range (permanent, as from a failing disk;
transient, as from a flaky network file system), reads that stop short, and a shard truncated
on disk while it streams. Wrappers from warmstart.testing.faultsources are put around the real
local sources where the loader opens them; everything else is the real load()."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from matrix import oracle, same_bytes
from warmstart.errors import RetriesExhausted, SourceError, TruncatedFile
from warmstart.loader import LoaderConfig, checkpoint, load, stream
from warmstart.testing.checkpoints import make_checkpoint
from warmstart.testing.faultsources import FailingRange, ShortReads

CFG = LoaderConfig(chunk_size=64 << 10, memory_budget=8 * ((64 << 10) + 8192),
                   concurrency=4, max_attempts=4, retry_base_delay=0.01,
                   retry_max_delay=0.02, direct_io=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("local"), 6 << 20, shards=3,
                             dtype=torch.float16)
    return folder, oracle(folder)


def second_shard(folder) -> str:
    return str(sorted(folder.glob("*.safetensors"))[1])


@pytest.fixture
def wrap(monkeypatch):
    """wrap(path, make) puts make(source) around the source the loader opens for `path`."""
    real = checkpoint.LocalFileSource
    wrappers = {}

    def install(path: str, make):
        def factory(p, executor, *, direct=False):
            source = real(p, executor, direct=direct)
            if p == path:
                source = wrappers[p] = make(source)
            return source
        monkeypatch.setattr(checkpoint, "LocalFileSource", factory)
        return wrappers

    return install


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_eio_on_a_range_fails_fast_naming_file_and_offset(ckpt, wrap):
    folder, _ = ckpt
    shard = second_shard(folder)
    made = wrap(shard, lambda s: FailingRange(s, 1 << 20, (1 << 20) + 1))
    load(str(folder), config=CFG, names=[])  # warm up the loop thread
    before = fds()
    with pytest.raises(SourceError) as info:
        load(str(folder), config=CFG)
    # fast means no retries (a verdict a busy machine cannot change): not a RetriesExhausted,
    # and the failing range was read at most once per reader
    assert not isinstance(info.value, RetriesExhausted)  # a disk's EIO is not retried
    assert info.value.errno == errno.EIO
    assert shard in str(info.value) and "offset" in str(info.value)
    assert 1 <= made[shard].injected <= CFG.concurrency
    assert fds() <= before


def test_transient_eio_is_retried_to_identical_bytes(ckpt, wrap):
    folder, want = ckpt
    shard = second_shard(folder)
    made = wrap(shard, lambda s: FailingRange(s, 0, 1 << 40, times=3, retryable=True))
    assert same_bytes(load(str(folder), config=CFG), want)
    assert made[shard].injected == 3


def test_transient_eio_past_the_bound_names_file_and_bytes(ckpt, wrap):
    folder, _ = ckpt
    shard = second_shard(folder)
    wrap(shard, lambda s: FailingRange(s, 1 << 20, (1 << 20) + 1, retryable=True))
    with pytest.raises(RetriesExhausted, match=f"{shard}: bytes \\d+-\\d+: gave up after 4"):
        load(str(folder), config=CFG)


def test_short_reads_fail_with_truncated_file(ckpt, wrap):
    folder, _ = ckpt
    shard = second_shard(folder)
    wrap(shard, lambda s: ShortReads(s, 1 << 20))
    with pytest.raises(TruncatedFile, match=f"{shard}: file ended after"):
        load(str(folder), config=CFG)


def test_shard_truncated_on_disk_while_streaming(ckpt, tmp_path):
    """A real short read: the last shard shrinks on disk after the load started."""
    folder, _ = ckpt
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    last = sorted(copy.glob("*.safetensors"))[-1]
    it = stream(str(copy), config=CFG.replace(group_size=CFG.chunk_size))
    next(it)
    os.truncate(last, os.path.getsize(last) // 2)
    with pytest.raises(TruncatedFile, match=str(last)):
        for _ in it:
            pass
