"""Local files already in the page cache, loaded for the CPU: tensors that view the files."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from warmstart.errors import TruncatedFile
from warmstart.loader import LoaderConfig, load, stream
from warmstart.loader.sources.local import FileMapping

MAPPED = LoaderConfig(mmap=True, chunk_size=4096, memory_budget=8 << 10, group_size=8192)


@pytest.fixture
def shard(tmp_path):
    gen = torch.Generator().manual_seed(7)
    tensors = {f"w{i}": torch.randn(64, 33 + i, generator=gen) for i in range(12)}
    tensors["ids"] = torch.arange(100, dtype=torch.int64)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def how_loaded(caplog) -> str:
    done = [r.getMessage() for r in caplog.records if "tensors," in r.getMessage()]
    assert done, "the loader logs one line per load"
    return done[-1]


def test_auto_maps_a_cached_file_and_copies_when_told_not_to(shard, caplog):
    path, tensors = shard
    path.read_bytes()  # in the page cache
    with caplog.at_level(logging.INFO, logger="warmstart.loader"):
        got = load(str(path))
        assert "mapped from the page cache" in how_loaded(caplog)
        copied = load(str(path), config=LoaderConfig(mmap=False))
        assert "read in place" in how_loaded(caplog)
        load(str(path), config=LoaderConfig(direct_io=True))
        assert "mapped" not in how_loaded(caplog)
    for name, t in tensors.items():
        assert torch.equal(got[name], t) and torch.equal(copied[name], t)


def test_writes_to_a_mapped_tensor_never_reach_the_file(shard):
    path, tensors = shard
    before = path.read_bytes()
    got = load(str(path), config=MAPPED)
    got["w0"].fill_(123.0)
    got["ids"].zero_()
    assert path.read_bytes() == before
    assert torch.equal(load_file(str(path))["w0"], tensors["w0"])
    assert torch.equal(load(str(path), config=MAPPED)["ids"], tensors["ids"])


def test_tensors_outlive_the_file_and_the_loader(shard):
    path, tensors = shard
    got = dict(stream(str(path), config=MAPPED))
    path.unlink()  # the mapping keeps the inode's pages alive
    for name, t in tensors.items():
        assert torch.equal(got[name], t)


def test_names_dtype_and_progress(shard):
    path, tensors = shard
    seen = []
    got = load(str(path), names=["w3", "ids"], dtype=torch.float16, config=MAPPED,
               progress=lambda done, total: seen.append((done, total)))
    assert set(got) == {"w3", "ids"}
    assert torch.equal(got["w3"], tensors["w3"].to(torch.float16))
    assert got["ids"].dtype == torch.int64
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


def test_a_file_that_shrank_is_a_named_error(shard):
    path, _ = shard
    size = path.stat().st_size
    with open(path, "r+b") as f:
        mapping = FileMapping(str(path), f.fileno(), 100, size)
        f.truncate(4096)
    with pytest.raises(TruncatedFile, match="m.safetensors"):
        mapping.populate()


def test_touch_pages_reads_one_byte_per_page_and_the_last():
    import ctypes

    from warmstart import _native
    buf = (ctypes.c_ubyte * 10_000)()
    for at, value in ((0, 1), (4095, 50), (4096, 2), (8192, 4), (9999, 8)):
        buf[at] = value
    assert _native.touch_pages(ctypes.addressof(buf), 10_000, 4096) == 1 + 2 + 4 + 8
    assert _native.touch_pages(ctypes.addressof(buf), 0, 4096) == 0


def test_populate_in_steps_makes_every_part_resident_once(shard, monkeypatch):
    import warmstart.loader.sources.local as local
    path, _ = shard
    size = path.stat().st_size
    monkeypatch.setattr(local, "POPULATE_STEP", 8192)
    steps = []
    real = local.FileMapping._populate
    monkeypatch.setattr(local.FileMapping, "_populate",
                        lambda self, s, n: (steps.append((s, n)), real(self, s, n)))
    with open(path, "rb") as f:
        mapping = FileMapping(str(path), f.fileno(), 0, size)
    mapping.populate()
    assert steps[0][0] == 0 and sum(n for _, n in steps) == len(mapping.buffer)
    assert all(a + n == b for (a, n), (b, _) in zip(steps, steps[1:]))
    assert all(n <= 8192 for _, n in steps)
