"""Builders of safetensors bytes, good and bad, for the loader tests."""

from __future__ import annotations

import json
import struct

import torch

ALL_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}


def raw_file(header: dict, data: bytes, pad_to: int = 1) -> bytes:
    """A safetensors file from an explicit header dict (no validation: for bad inputs)."""
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % pad_to)
    return struct.pack("<Q", len(text)) + text + data


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator):
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), generator=gen, dtype=torch.uint8)
    t = raw.view(dtype).reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        # keep NaN payloads out of the comparison: torch.equal treats NaN != NaN
        t = torch.where(torch.isnan(t), torch.zeros((), dtype=dtype), t)
    return t


def odd_offset_file(tensors: dict[str, torch.Tensor]) -> bytes:
    """A valid file whose tensors sit at offsets not aligned to their element size."""
    header, blobs, offset = {}, [], 0
    for i, (name, t) in enumerate(tensors.items()):
        if i % 2 == 1:  # a 1-byte U8 spacer knocks the following tensor off alignment
            spacer = f"spacer.{i}"
            header[spacer] = {"dtype": "U8", "shape": [1], "data_offsets": [offset, offset + 1]}
            blobs.append(b"\x07")
            offset += 1
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = next(k for k, v in ALL_DTYPES.items() if v == t.dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    return raw_file(header, b"".join(blobs))
