"""The safetensors header parser: every way a header can be wrong gets a named error."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from loader_helpers import raw_file
from warmstart.errors import (BadOffsets, FormatError, HeaderTooLarge, InvalidHeader,
                              ShapeMismatch, TruncatedFile, UnknownDtype)
from warmstart.loader.header import MAX_HEADER_BYTES, parse_header


def parse(blob: bytes):
    return parse_header(blob, len(blob), "bad.safetensors")


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_valid_file_from_safetensors():
    blob = save({"w": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16),
                 "s": torch.tensor(7)}, metadata={"format": "pt"})
    h = parse(blob)
    assert {t.name for t in h.tensors} == {"w", "b", "s"}
    assert [t.begin for t in h.tensors] == sorted(t.begin for t in h.tensors)
    assert h.metadata == {"format": "pt"}
    assert h.tensors[-1].end == len(blob) - h.data_start


@pytest.mark.parametrize("blob, error, words", [
    (b"", TruncatedFile, "too short"),
    (b"\x01\x02", TruncatedFile, "too short"),
    (struct.pack("<Q", 100) + b"{}", HeaderTooLarge, "past the end"),
    (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", HeaderTooLarge, "cap"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", InvalidHeader, "UTF-8"),
    (struct.pack("<Q", 4) + b"{abc", InvalidHeader, "JSON"),
    (struct.pack("<Q", 2) + b"[]", InvalidHeader, "object"),
])
def test_broken_prefix_and_json(blob, error, words):
    with pytest.raises(error, match=words) as info:
        parse(blob)
    assert "bad.safetensors" in str(info.value)


@pytest.mark.parametrize("header, data, error, words", [
    ({"t": entry(dtype="F128")}, b"\0" * 8, UnknownDtype, "F128"),
    ({"t": entry(dtype=3)}, b"\0" * 8, InvalidHeader, "dtype"),
    ({"t": entry(shape=(3,))}, b"\0" * 8, ShapeMismatch, "needs 12 bytes"),
    ({"t": entry(shape=(-2,))}, b"\0" * 8, InvalidHeader, "shape"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, b"\0" * 8,
     InvalidHeader, "unexpected"),
    ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, InvalidHeader, "missing"),
    ({"t": entry(begin=8, end=0)}, b"\0" * 8, BadOffsets, "before begin"),
    ({"t": entry(begin=0, end=8)}, b"\0" * 4, BadOffsets, "past"),
    ({"t": entry(), "u": entry(begin=4, end=12)}, b"\0" * 12, BadOffsets, "overlaps"),
    ({"t": entry(), "u": entry(begin=12, end=20)}, b"\0" * 20, BadOffsets, "hole"),
    ({"t": entry()}, b"\0" * 9, BadOffsets, "trailing"),
    ({"__metadata__": {"a": 1}, "t": entry()}, b"\0" * 8, InvalidHeader, "__metadata__"),
    ({"t": entry(shape=[2] * 65, end=8)}, b"\0" * 8, InvalidHeader, "shape"),
])
def test_bad_entries(header, data, error, words):
    with pytest.raises(error, match=words) as info:
        parse(raw_file(header, data))
    assert "bad.safetensors" in str(info.value)


def test_names_the_tensor():
    with pytest.raises(ShapeMismatch, match="'layer.0.weight'"):
        parse(raw_file({"layer.0.weight": entry(shape=(5,))}, b"\0" * 8))


def test_duplicate_keys_rejected():
    text = b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
           b'"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    with pytest.raises(InvalidHeader, match="duplicate key 't'"):
        parse(struct.pack("<Q", len(text)) + text + b"\0")


def test_empty_and_scalar_tensors_tile():
    header = {"e": entry(shape=(0, 3), begin=0, end=0), "s": entry(shape=(), begin=0, end=4),
              "e2": entry(shape=(0,), begin=4, end=4)}
    h = parse(raw_file(header, b"\0" * 4))
    assert sorted(t.name for t in h.tensors) == ["e", "e2", "s"]


def test_deeply_nested_json_is_rejected_not_crashing():
    text = b"[" * 100000 + b"]" * 100000
    with pytest.raises(InvalidHeader):
        parse(struct.pack("<Q", len(text)) + text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_never_escape_the_tree(blob):
    try:
        parse(blob)
    except FormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.text(max_size=8),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "U8", "BF16", "X", 5]),
        "shape": st.lists(st.integers(-1, 5), max_size=3),
        "data_offsets": st.lists(st.integers(-2, 64), min_size=1, max_size=3)}),
    max_size=4), st.binary(max_size=64))
def test_fuzz_structured_headers(header, data):
    try:
        h = parse(raw_file(header, data))
    except FormatError:
        return
    # whatever is accepted tiles the data exactly
    assert sum(t.nbytes for t in h.tensors) == len(data)
