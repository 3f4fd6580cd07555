"""Microbenchmarks of warmstart's hot pieces (pytest-benchmark), outside the normal test run
(the repository's `testpaths` is `tests/`):

    pytest benchmarks/micro --benchmark-only
"""

from __future__ import annotations

import json
import math
import struct

import pytest

from warmstart.testing.checkpoints import llama_like_shapes


def header_bytes(total_bytes: int) -> tuple[bytes, int]:
    """The prefix + header of a Llama-shaped bf16 file of about `total_bytes`, and the size
    that file would have: real header shapes without writing the data."""
    doc, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in llama_like_shapes(total_bytes).items():
        n = math.prod(shape) * 2
        doc[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + offset


@pytest.fixture(scope="session")
def llama_header() -> tuple[bytes, int]:
    return header_bytes(16 << 30)
