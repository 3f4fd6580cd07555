"""`verify=True`: every block read is checked against the shard's `.sums` sidecar."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from warmstart.cli import main as cli
from warmstart.errors import CorruptRead, FormatError, IntegrityError, NotFound, RetriesExhausted
from warmstart.loader import LoaderConfig, load, stream
from warmstart.loader.sums import parse_sums
from warmstart.testing.checkpoints import make_checkpoint

MiB = 1 << 20
MODES = {
    "in-place": LoaderConfig(verify=True, chunk_size=2 * MiB, max_attempts=2,
                             retry_base_delay=0.01),
    "staged": LoaderConfig(verify=True, chunk_size=2 * MiB, staged=True, max_attempts=2,
                           retry_base_delay=0.01),
    "odirect": LoaderConfig(verify=True, chunk_size=2 * MiB, direct_io=True, max_attempts=2,
                            retry_base_delay=0.01),
}


@pytest.fixture
def folder(tmp_path):
    path = make_checkpoint(tmp_path / "ck", 12 * MiB, shards=2, dtype=torch.float16)
    assert cli(["sums", str(path)]) == 0
    return path


def oracle(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update({k: v.clone() for k, v in load_file(str(shard)).items()})  # not mapped
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_verified_load_is_identical(folder, mode):
    want = oracle(folder)
    got = load(str(folder), config=MODES[mode])
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("mode", list(MODES))
def test_a_flipped_byte_on_disk_fails_naming_object_and_range(folder, mode):
    want = oracle(folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    at = len(data) - 3 * MiB // 2  # inside a tensor, in the next-to-last block
    data[at] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(RetriesExhausted) as info:
        load(str(folder), config=MODES[mode])
    assert shard.name in str(info.value) and "block sum" in str(info.value)
    assert isinstance(info.value.__cause__, CorruptRead)
    block = at // MiB
    assert f"bytes {block * MiB}-" in str(info.value)
    # without verify the flip goes through unnoticed: the reason the option exists
    got = load(str(folder), config=LoaderConfig(mmap=False))
    assert any(not torch.equal(got[n], t) for n, t in want.items())


def test_missing_damaged_or_stale_sidecars_are_named(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    sidecar = shard.with_name(shard.name + ".sums")
    doc = json.loads(sidecar.read_text())

    sidecar.write_text(json.dumps({**doc, "sums": [s ^ 1 for s in doc["sums"]]}))
    with pytest.raises(FormatError, match="check"):
        load(str(folder), verify=True)
    sidecar.write_text(json.dumps({**doc, "size": doc["size"] + 1}))
    with pytest.raises(IntegrityError, match="describes"):
        load(str(folder), verify=True)
    sidecar.unlink()
    with pytest.raises(NotFound, match=r"\.sums.*warmstart sums"):
        load(str(folder), verify=True)
    assert cli(["sums", str(shard)]) == 0
    shard.write_bytes(shard.read_bytes() + b"\0")  # the shard changed after its sums
    with pytest.raises(IntegrityError):
        list(stream(str(folder), verify=True))


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"format": "warmstart-block-sums"}',
                                 b'{"format": "warmstart-block-sums", "version": 1, '
                                 b'"algorithm": "crc32", "block_size": 100, "size": 0, '
                                 b'"sums": [], "check": 0}',
                                 b"\xff\xfe"])
def test_sidecar_parser_rejects_with_a_named_error(raw):
    with pytest.raises(FormatError, match="x.sums"):
        parse_sums(raw, "x.sums")
