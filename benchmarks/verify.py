"""Materialize and fingerprint loaded tensors the same way for every peer.

`materialize` makes every byte resident at the destination before a peer's clock stops: it
reads one byte per 4 KiB page of every tensor (so lazily mapped tensors fault in), and on a GPU
waits for every queued copy. `tensor_digest` is computed after the clock stops: blake2b over
(name, shape, blake2b(bytes)) in name order. `reference_digest` computes the same value straight
from safetensors files (or any sequential byte stream of them), independently of any loader.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import BinaryIO, Iterable, Mapping

import torch

PAGE = 4096
DIGEST = "blake2b-256 over (name, shape, blake2b(bytes)) in name order"


def materialize(tensors: Mapping[str, torch.Tensor]) -> int:
    """Touches one byte per page of every tensor; returns the tensor bytes."""
    total = 0
    cuda = False
    for tensor in tensors.values():
        nbytes = tensor.numel() * tensor.element_size()
        total += nbytes
        if nbytes == 0:
            continue
        cuda = cuda or tensor.is_cuda
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        flat[::PAGE].sum()
    if cuda:
        torch.cuda.synchronize()
    return total


def _name_record(name: str, shape: Iterable[int], data_hash: bytes) -> bytes:
    return name.encode() + b"\0" + json.dumps(list(shape)).encode() + b"\0" + data_hash


def combine(records: Mapping[str, bytes]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(records):
        h.update(records[name])
    return h.hexdigest()


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    records = {}
    for name, tensor in tensors.items():
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        records[name] = _name_record(name, tensor.shape,
                                     hashlib.blake2b(data.numpy(), digest_size=32).digest())
    return combine(records)


def stream_records(stream: BinaryIO, what: str) -> tuple[dict[str, bytes], int]:
    """Reads one safetensors file front to back; returns its digest records and tensor bytes."""
    (length,) = struct.unpack("<Q", _read_exact(stream, 8, what))
    header = json.loads(_read_exact(stream, length, what))
    header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    records, pos, total = {}, 0, 0
    for name, spec in entries:
        begin, end = spec["data_offsets"]
        if begin > pos:
            _read_exact(stream, begin - pos, what)
        h = hashlib.blake2b(digest_size=32)
        left = end - begin
        while left:
            block = _read_exact(stream, min(left, 16 << 20), what)
            h.update(block)
            left -= len(block)
        records[name] = _name_record(name, spec["shape"], h.digest())
        pos = max(pos, end)
        total += end - begin
    return records, total


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise ValueError(f"{what}: file ended early")
        data += more
    return data


def reference_digest(files: Iterable[str]) -> tuple[str, int, int]:
    """(digest, tensor bytes, tensor count) of local safetensors files."""
    records: dict[str, bytes] = {}
    total = 0
    for path in files:
        with open(path, "rb") as f:
            recs, nbytes = stream_records(f, path)
        records.update(recs)
        total += nbytes
    return combine(records), total, len(records)
