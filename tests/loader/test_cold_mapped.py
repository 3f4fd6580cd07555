"""Cold local files loaded for the CPU are mapped too (the kernel's readahead reads them faster
than O_DIRECT on the machines measured), each batch made resident by several threads at once."""

from __future__ import annotations

import logging
import mmap
import os

import pytest
import torch
from safetensors.torch import load_file

from warmstart.loader import LoaderConfig, load
from warmstart.loader.mapped import POPULATE_MIN_PART, POPULATE_THREADS, populate_parts
from warmstart.loader.sources.local import AUTO_DIRECT_MIN_BYTES, LocalFileSource
from warmstart.testing.checkpoints import make_checkpoint


@pytest.mark.parametrize("length", [1, 4096, POPULATE_MIN_PART - 1, POPULATE_MIN_PART,
                                    3 * POPULATE_MIN_PART + 12345, 1 << 30, (1 << 30) + 1])
def test_populate_parts_cover_the_mapping_in_page_aligned_parts(length):
    parts = populate_parts(length)
    assert 1 <= len(parts) <= POPULATE_THREADS
    assert parts[0][0] == 0 and sum(n for _, n in parts) == length
    for (start, n), (following, _) in zip(parts, parts[1:]):
        assert start + n == following and following % mmap.PAGESIZE == 0
    if length < 2 * POPULATE_MIN_PART:
        assert len(parts) == 1
    else:
        assert min(n for _, n in parts) >= POPULATE_MIN_PART - mmap.PAGESIZE * len(parts)


def evict(path) -> float:
    """Drops the file from the page cache (clean pages go with POSIX_FADV_DONTNEED); returns
    the share of its pages still cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    src = LocalFileSource(str(path), None)
    try:
        return src.cached_share()
    finally:
        os.close(src._fd)


def test_a_cold_file_is_mapped_and_identical(tmp_path, caplog):
    path = make_checkpoint(tmp_path, AUTO_DIRECT_MIN_BYTES + (8 << 20), dtype=torch.float16)
    want = {name: t.clone() for name, t in load_file(str(path)).items()}  # no mapping left
    share = evict(path)
    if share >= 0.5:
        pytest.skip(f"this file system keeps the file cached ({share:.0%}) after DONTNEED")
    with caplog.at_level(logging.INFO, logger="warmstart.loader"):
        got = load(str(path), config=LoaderConfig())  # auto: the file counts as cold
    done = [r.getMessage() for r in caplog.records if "tensors," in r.getMessage()]
    assert done and done[-1].endswith("mapped from the page cache)")
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    evict(path)
    with caplog.at_level(logging.INFO, logger="warmstart.loader"):
        direct = load(str(path), config=LoaderConfig(direct_io=True))  # asked for: O_DIRECT
    done = [r.getMessage() for r in caplog.records if "tensors," in r.getMessage()]
    assert done[-1].endswith("read in place)")
    assert all(torch.equal(direct[name], t) for name, t in want.items())
