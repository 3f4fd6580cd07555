"""The native FastCDC loop: same cuts as the Python reference, streaming-safe, shift-stable."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmstart import _native
from warmstart.imageformat import chunking
from warmstart.imageformat.model import Chunking


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("params", [(64, 256, 1024), (100, 300, 700), (16, 16, 16)])
def test_native_matches_reference(params):
    blob = data(60_000) + b"\0" * 5000 + data(3000, 1)
    assert _native.fastcdc_cuts(blob, *params, True) == chunking.reference_cuts(blob, *params)


def test_bounds_and_coverage():
    blob = data(4 << 20)
    cuts = _native.fastcdc_cuts(blob, 64 << 10, 256 << 10, 1 << 20, True)
    assert sum(cuts) == len(blob)
    assert all(64 << 10 < c <= 1 << 20 for c in cuts[:-1])
    assert 8 <= len(cuts) <= 40  # roughly avg-sized chunks
    assert _native.fastcdc_cuts(b"", 1, 2, 4, True) == []
    with pytest.raises(ValueError):
        _native.fastcdc_cuts(b"abc", 10, 5, 20, True)


def test_not_final_keeps_the_tail():
    blob = data(10_000)
    full = _native.fastcdc_cuts(blob, 64, 256, 1024, True)
    partial = _native.fastcdc_cuts(blob, 64, 256, 1024, False)
    assert partial == full[:len(partial)] and sum(partial) < len(blob)


def test_streaming_windows_give_the_same_chunks(monkeypatch):
    blob = data(300_000, 3)
    params = Chunking(min=512, avg=2048, max=8192)
    whole = [d for d, _ in chunking.iter_chunks(io.BytesIO(blob), len(blob), params)]
    monkeypatch.setattr(chunking, "WINDOW", 4096)
    small = [d for d, p in chunking.iter_chunks(io.BytesIO(blob), len(blob), params)]
    assert whole == small and len(whole) > 50


def test_an_insert_only_changes_nearby_chunks():
    blob = data(2 << 20, 4)
    edited = blob[:1_000_000] + b"inserted bytes" + blob[1_000_000:]
    params = Chunking()
    a = {d for d, _ in chunking.iter_chunks(io.BytesIO(blob), len(blob), params)}
    b = {d for d, _ in chunking.iter_chunks(io.BytesIO(edited), len(edited), params)}
    assert len(a - b) <= 2 and len(a & b) >= len(a) - 2


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=5000), st.integers(1, 64), st.integers(0, 200),
       st.integers(0, 800))
def test_fuzz_native_equals_reference(blob, mn, extra_avg, extra_max):
    avg, mx = mn + extra_avg, mn + extra_avg + extra_max
    assert _native.fastcdc_cuts(blob, mn, avg, mx, True) == \
        chunking.reference_cuts(blob, mn, avg, mx)
