"""Parse and validate safetensors headers: pure functions, no I/O.

A safetensors file is `u64 little-endian header length N`, `N bytes of UTF-8 JSON`, then the
data. The JSON maps tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}`
(offsets relative to the data start) plus an optional `__metadata__` string map. Everything
here treats the bytes as hostile: sizes are capped, arithmetic is checked, offsets must tile
the data exactly, and every failure is a named `FormatError` that names the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from warmstart.errors import (BadOffsets, HeaderTooLarge, InvalidHeader, ShapeMismatch,
                              TruncatedFile, UnknownDtype)

PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the reference implementation's cap
MAX_DIMS = 64
MAX_TENSORS = 1_000_000

# safetensors dtype -> (torch dtype attribute name, bytes per element)
DTYPES: Mapping[str, tuple[str, int]] = MappingProxyType({
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2),
    "I8": ("int8", 1), "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1), "F8_E8M0": ("float8_e8m0fnu", 1), "C64": ("complex64", 8),
})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; offsets are relative to the data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


@dataclass(frozen=True)
class Header:
    """A validated header: tensors sorted by offset, and where the data starts."""

    source: str
    data_start: int
    file_size: int
    tensors: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] | None


def header_length(prefix: bytes, file_size: int, source: str) -> int:
    """Reads the 8-byte length prefix and checks it against the file size and the cap."""
    if file_size < PREFIX_BYTES or len(prefix) < PREFIX_BYTES:
        raise TruncatedFile(f"{source}: {file_size} bytes is too short for a safetensors file "
                            f"(needs an 8-byte header length)")
    (length,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if length > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"{source}: header length {length} exceeds the cap of "
                             f"{MAX_HEADER_BYTES} bytes")
    if PREFIX_BYTES + length > file_size:
        raise HeaderTooLarge(f"{source}: header length {length} runs past the end of the "
                             f"{file_size}-byte file")
    return length


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidHeader(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_header(prefix_and_header: bytes, file_size: int, source: str) -> Header:
    """Validates `prefix + header JSON` of a file of `file_size` bytes named `source`."""
    length = header_length(prefix_and_header, file_size, source)
    raw = prefix_and_header[PREFIX_BYTES:PREFIX_BYTES + length]
    if len(raw) < length:
        raise TruncatedFile(f"{source}: header is {length} bytes but only {len(raw)} were read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidHeader(f"{source}: header is not valid UTF-8 ({exc.reason} at byte "
                            f"{exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except InvalidHeader as exc:
        raise InvalidHeader(f"{source}: header JSON has a {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidHeader(f"{source}: header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidHeader(f"{source}: header must be a JSON object, got "
                            f"{type(doc).__name__}")
    data_start = PREFIX_BYTES + length
    data_size = file_size - data_start
    metadata = _parse_metadata(doc.pop("__metadata__", None), source)
    if len(doc) > MAX_TENSORS:
        raise InvalidHeader(f"{source}: {len(doc)} tensors exceeds the cap of {MAX_TENSORS}")
    tensors = sorted((_parse_entry(name, spec, source) for name, spec in doc.items()),
                     key=lambda t: (t.begin, t.end))
    _check_tiling(tensors, data_size, source)
    return Header(source=source, data_start=data_start, file_size=file_size,
                  tensors=tuple(tensors),
                  metadata=MappingProxyType(metadata) if metadata is not None else None)


def _parse_metadata(value: object, source: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidHeader(f"{source}: __metadata__ must map strings to strings")
    return dict(value)


def _parse_entry(name: str, spec: object, source: str) -> TensorEntry:
    where = f"{source}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise InvalidHeader(f"{where}: entry must be an object")
    extra = set(spec) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(spec)
    if missing or extra:
        problem = (f"missing {sorted(missing)}" if missing else f"unexpected {sorted(extra)}")
        raise InvalidHeader(f"{where}: entry has {problem} fields")
    dtype = spec["dtype"]
    if not isinstance(dtype, str):
        raise InvalidHeader(f"{where}: dtype must be a string")
    if dtype not in DTYPES:
        raise UnknownDtype(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    shape = spec["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidHeader(f"{where}: shape must be a list of at most {MAX_DIMS} "
                            f"non-negative integers, got {shape!r}"[:500])
    offsets = spec["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise InvalidHeader(f"{where}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise BadOffsets(f"{where}: data_offsets end {end} is before begin {begin}")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if expected != end - begin:
        raise ShapeMismatch(f"{where}: shape {shape} of {dtype} needs {expected} bytes but "
                            f"data_offsets span {end - begin}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(tensors: list[TensorEntry], data_size: int, source: str) -> None:
    """Offsets must cover the data exactly: no overlap, no hole, nothing past the end."""
    cursor = 0
    for t in tensors:
        if t.end > data_size:
            raise BadOffsets(f"{source}: tensor {t.name!r} ends at data offset {t.end}, past "
                             f"the {data_size} bytes of data")
        if t.begin < cursor:
            raise BadOffsets(f"{source}: tensor {t.name!r} at [{t.begin}, {t.end}) overlaps "
                             f"the tensor before it (ending at {cursor})")
        if t.begin > cursor:
            raise BadOffsets(f"{source}: hole of {t.begin - cursor} bytes before tensor "
                             f"{t.name!r} at data offset {cursor}")
        cursor = t.end
    if cursor != data_size:
        raise BadOffsets(f"{source}: tensors end at data offset {cursor} but the file has "
                         f"{data_size} bytes of data ({data_size - cursor} trailing bytes)")
