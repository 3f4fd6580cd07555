"""Bad checkpoints on disk fail with named errors that say which file and tensor; no
threads or file descriptors are left behind."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import save, save_file

from warmstart.errors import (BadOffsets, ConfigError, DuplicateTensor, HeaderTooLarge,
                              MissingTensor, NotFound, ShardIndexError, SourceError,
                              TruncatedFile, WarmstartError)
from warmstart.loader import LoaderConfig, load, stream, sync

from settle_helpers import settled


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks():
    sync.loop()  # the facade's loop (its epoll and wake-up fds) lives for the process
    before_threads = {t.name for t in threading.enumerate()}
    before_fds = open_fds()
    yield

    def sample():  # the sync facade's own loop thread and its helpers live for the process
        return ({t.name for t in threading.enumerate() if not t.name.startswith(
            ("warmstart-loop", "warmstart-aux"))} - before_threads, open_fds())

    leftover, fds = settled(sample, lambda s: not s[0] and s[1] <= before_fds)
    assert not leftover, f"threads left running: {leftover}"
    assert fds <= before_fds, "file descriptors leaked"


def shard_dir(tmp_path, index: dict, shards: dict[str, dict[str, torch.Tensor]]):
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def test_missing_file(tmp_path, no_leaks):
    with pytest.raises(NotFound, match="nope.safetensors") as info:
        load(str(tmp_path / "nope.safetensors"))
    assert isinstance(info.value, FileNotFoundError)


def test_empty_folder(tmp_path, no_leaks):
    with pytest.raises(NotFound, match="no .safetensors"):
        load(str(tmp_path))


def test_truncated_data(tmp_path, no_leaks):
    blob = save({"a": torch.zeros(1000), "b": torch.ones(1000)})
    path = tmp_path / "cut.safetensors"
    path.write_bytes(blob[:-100])
    with pytest.raises(BadOffsets, match="cut.safetensors") as info:
        load(str(path))
    assert "'b'" in str(info.value)


def test_header_longer_than_file(tmp_path, no_leaks):
    path = tmp_path / "short.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(HeaderTooLarge, match="short.safetensors"):
        load(str(path))


def test_tiny_file(tmp_path, no_leaks):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(TruncatedFile, match="tiny.safetensors"):
        load(str(path))


def test_index_points_at_missing_shard(tmp_path, no_leaks):
    d = shard_dir(tmp_path, {"weight_map": {"a": "a.safetensors", "b": "gone.safetensors"}},
                  {"a.safetensors": {"a": torch.zeros(2)}})
    with pytest.raises(NotFound, match="gone.safetensors"):
        load(str(d))


def test_index_lists_tensor_twice(tmp_path, no_leaks):
    d = tmp_path
    save_file({"a": torch.zeros(2)}, str(d / "a.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "a.safetensors", "a": "a.safetensors"}}')
    with pytest.raises(ShardIndexError, match="'a' is listed twice"):
        load(str(d))


def test_tensor_in_two_shards(tmp_path, no_leaks):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(DuplicateTensor, match="'a'"):
        load(str(tmp_path))


def test_index_and_shard_disagree(tmp_path, no_leaks):
    d = shard_dir(tmp_path, {"weight_map": {"a": "a.safetensors", "z": "a.safetensors"}},
                  {"a.safetensors": {"a": torch.zeros(2)}})
    with pytest.raises(ShardIndexError, match="'z'"):
        load(str(d))


@pytest.mark.parametrize("shard", ["../escape.safetensors", "/etc/passwd", "a/../../b"])
def test_index_path_traversal(tmp_path, shard, no_leaks):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(ShardIndexError, match="relative path"):
        load(str(tmp_path))


def test_missing_named_tensor(tmp_path, no_leaks):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(MissingTensor, match="'b'"):
        load(str(tmp_path / "m.safetensors"), names=["a", "b"])


def test_file_shrinks_during_load(tmp_path, no_leaks):
    """A file cut short after its header was read: a named error, nothing returned."""
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((4096,), float(i)) for i in range(8)}, str(path))
    cfg = LoaderConfig(chunk_size=4096, memory_budget=4 * (4096 + 8192))
    it = stream(str(path), config=cfg)
    next(it)
    os.truncate(path, 20_000)
    with pytest.raises((TruncatedFile, SourceError)) as info:
        for _ in it:
            pass
    assert "m.safetensors" in str(info.value)


def test_bad_config_and_device():
    with pytest.raises(ConfigError, match="'bogus'.*valid options are: chunk_size"):
        LoaderConfig.from_mapping({"bogus": 1})
    with pytest.raises(ConfigError, match="memory_budget"):
        LoaderConfig(chunk_size=1 << 20, memory_budget=1 << 20)
    with pytest.raises(ConfigError, match="device"):
        load("/nonexistent", device="tpu")
    with pytest.raises(WarmstartError, match="CUDA"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        load("/nonexistent", device="cuda:0")


def test_small_budget_derives_chunk_size(tmp_path):
    """An unset chunk size shrinks to fit the budget; an explicit impossible pair is named."""
    cfg = LoaderConfig(memory_budget=1 << 20)
    assert cfg.chunk_size % 4096 == 0 and 2 * (cfg.chunk_size + 8192) <= 1 << 20
    assert LoaderConfig().chunk_size == 16 << 20
    assert LoaderConfig.from_mapping({"memory_budget": "64MiB"}).chunk_size == 16 << 20
    # the derivation follows the budget through replace(); an explicit size sticks
    assert cfg.replace(memory_budget="256MiB").chunk_size == 16 << 20
    assert LoaderConfig(chunk_size=8192, memory_budget=1 << 20).replace(
        memory_budget=4 << 20).chunk_size == 8192
    with pytest.raises(ConfigError, match=r"memory_budget \(1048576\).*chunk_size \(1048576\)"):
        LoaderConfig(chunk_size=1 << 20, memory_budget=1 << 20)
    with pytest.raises(ConfigError, match="memory_budget .*too small"):
        LoaderConfig(memory_budget=4096)
    path = tmp_path / "m.safetensors"
    tensors = {f"t{i}": torch.full((70_000,), float(i)) for i in range(4)}
    save_file(tensors, str(path))
    got = load(str(path), memory_budget=1 << 20, staged=True)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
