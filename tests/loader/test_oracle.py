"""Bit-identical to `safetensors.torch.load_file`, every dtype, every layout and mode."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import warmstart
from loader_helpers import ALL_DTYPES, odd_offset_file, random_tensor
from warmstart.loader import LoaderConfig, aload, astream, load, stream

TINY = LoaderConfig(chunk_size=4096, memory_budget=3 * (4096 + 8192), group_size=8192,
                    mmap=False)
MODES = {
    "default": LoaderConfig(),  # these files are cached: mapped
    "mapped-tiny-batches": LoaderConfig(mmap=True, chunk_size=4096, memory_budget=8 << 10,
                                        group_size=8192),
    "tiny-direct": TINY,
    "tiny-staged": TINY.replace(staged=True),
    "tiny-odirect": TINY.replace(direct_io=True),
}


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (code, dtype) in enumerate(ALL_DTYPES.items()):
        out[f"{code}.matrix"] = random_tensor(dtype, (17, 33 + i), gen)
        out[f"{code}.scalar"] = random_tensor(dtype, (), gen)
        out[f"{code}.empty"] = random_tensor(dtype, (0, 5), gen)
    out["big"] = random_tensor(torch.bfloat16, (300, 257), gen)
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        g = got[name]
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.equal(as_bytes(g), as_bytes(t)), name


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tensors = sample_tensors()
    save_file(tensors, str(root / "single.safetensors"), metadata={"format": "pt"})
    names = sorted(tensors)
    shards = [names[0::3], names[1::3], names[2::3]]
    sharded = root / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in group}, str(sharded / fname))
        weight_map.update({n: fname for n in group})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    folder = root / "folder"
    folder.mkdir()
    for i, group in enumerate(shards):
        save_file({n: tensors[n] for n in group}, str(folder / f"part{i}.safetensors"))
    return root, tensors


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["single.safetensors", "sharded",
                                    "sharded/model.safetensors.index.json", "folder"])
def test_local_matches_oracle(checkpoint, layout, mode):
    root, tensors = checkpoint
    got = load(str(root / layout), config=MODES[mode])
    assert_same(got, tensors)
    if layout == "single.safetensors":
        assert_same(got, load_file(str(root / layout)))


def test_stream_yields_every_tensor_once_and_whole(checkpoint):
    root, tensors = checkpoint
    seen = {}
    for name, t in stream(str(root / "sharded"), config=TINY):
        assert name not in seen
        seen[name] = t.clone()  # the consumer may drop the loader's buffer right away
    assert_same(seen, tensors)


def test_names_and_dtype(checkpoint):
    root, tensors = checkpoint
    names = ["F32.matrix", "I8.matrix", "big"]
    got = load(str(root / "sharded"), names=names, dtype=torch.float16, config=TINY)
    assert set(got) == set(names)
    assert got["F32.matrix"].dtype == torch.float16
    assert torch.equal(got["F32.matrix"], tensors["F32.matrix"].to(torch.float16))
    assert got["I8.matrix"].dtype == torch.int8  # integers are never cast
    assert torch.equal(got["I8.matrix"], tensors["I8.matrix"])


def test_odd_offsets(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {f"x{i}": random_tensor(dt, (7, 3), gen)
               for i, dt in enumerate([torch.float64, torch.int32, torch.bfloat16,
                                       torch.float32, torch.int64, torch.complex64])}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(odd_offset_file(tensors))
    want = load_file(str(path))
    for mode in MODES.values():
        assert_same(load(str(path), config=mode), want)


def test_async_api_and_sync_api_inside_a_running_loop(checkpoint):
    root, tensors = checkpoint

    async def main():
        got = await aload(str(root / "single.safetensors"), config=TINY)
        names = [n async for n, _ in astream(str(root / "folder"))]
        # the sync facade runs on warmstart's own thread, so it works inside a loop too
        again = load(str(root / "single.safetensors"))
        return got, names, again

    got, names, again = asyncio.run(main())
    assert_same(got, tensors)
    assert_same(again, tensors)
    assert sorted(names) == sorted(tensors)


def test_top_level_package_exports(checkpoint):
    root, tensors = checkpoint
    assert_same(warmstart.load(str(root / "single.safetensors")), tensors)
    assert warmstart.LoaderConfig is LoaderConfig


def test_progress_reports_every_byte(checkpoint):
    root, _ = checkpoint
    calls = []
    load(str(root / "sharded"), config=TINY, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def test_config_fields_as_keyword_options(checkpoint):
    root, tensors = checkpoint
    got = load(str(root / "folder"), memory_budget="64KiB", chunk_size=4096, concurrency=3,
               mmap=False)
    assert_same(got, tensors)
    names = [n for n, _ in stream(str(root / "single.safetensors"), config=TINY, mmap=True)]
    assert sorted(names) == sorted(tensors)
    with pytest.raises(warmstart.errors.ConfigError, match="chunk_sise"):
        load(str(root / "folder"), chunk_sise=4096)
