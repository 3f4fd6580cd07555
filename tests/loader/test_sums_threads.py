"""verify=True computes block sums off the event loop: for local files on the very thread
that read the block (one hop per chunk for read and check)."""

from __future__ import annotations

import threading
import types
import zlib

import pytest
import torch

from warmstart.cli import main as cli
from warmstart.errors import RetriesExhausted
from warmstart.loader import LoaderConfig, load
from warmstart.loader import sums as sums_module
from warmstart.loader.sources.local import LocalFileSource
from warmstart.testing.checkpoints import make_checkpoint

MiB = 1 << 20


@pytest.fixture
def spied(monkeypatch):
    """Records the thread of every block sum and of every blocking local read."""
    seen = {"crc": [], "read": []}
    real_read = LocalFileSource.read_blocking

    def crc32(data, *args):
        if isinstance(data, memoryview):  # a block (the sidecar's own check sums a string)
            seen["crc"].append(threading.current_thread().name)
        return zlib.crc32(data, *args)

    def read_blocking(self, offset, target):
        seen["read"].append(threading.current_thread().name)
        return real_read(self, offset, target)

    monkeypatch.setattr(sums_module, "zlib", types.SimpleNamespace(crc32=crc32))
    monkeypatch.setattr(LocalFileSource, "read_blocking", read_blocking)
    return seen


@pytest.mark.parametrize("config", [
    LoaderConfig(verify=True, chunk_size=2 * MiB),
    LoaderConfig(verify=True, chunk_size=2 * MiB, staged=True),
    LoaderConfig(verify=True, chunk_size=2 * MiB, direct_io=True)],
    ids=["in-place", "staged", "odirect"])
def test_block_sums_run_on_the_reading_threads_not_the_loop(tmp_path, spied, config):
    path = make_checkpoint(tmp_path / "ck", 8 * MiB, shards=2, dtype=torch.float16)
    assert cli(["sums", str(path)]) == 0
    spied["crc"].clear()  # the CLI's own sums
    load(str(path), config=config)
    assert len(spied["crc"]) >= 8  # every 1 MiB block of the data was checked
    assert "warmstart-loop" not in spied["crc"]
    assert all(name.startswith("warmstart-io") for name in spied["crc"])
    assert set(spied["crc"]) <= set(spied["read"])


def test_a_corrupt_block_found_on_a_worker_thread_is_still_the_named_error(tmp_path):
    path = make_checkpoint(tmp_path / "ck", 4 * MiB, dtype=torch.float16)
    assert cli(["sums", str(path)]) == 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RetriesExhausted, match="block sum"):
        load(str(path), config=LoaderConfig(verify=True, chunk_size=2 * MiB, max_attempts=2,
                                            retry_base_delay=0.01))
