"""Replays the corpus of tricky inputs in fuzz/corpus/<target>/ as regression tests.

A file named `accept-*` must parse and satisfy the target's invariants; `reject-*` must be
refused with the parser's named error. Several entries are inputs that once crashed a parser
with a builtin exception (RecursionError, UnicodeEncodeError, OverflowError, tarfile.ReadError)
or were accepted by convert and then refused by every reader; see docs/RELIABILITY.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.targets import TARGETS

CORPUS = Path(__file__).parent / "fuzz" / "corpus"
CASES = sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_corpus_covers_every_target():
    assert {p.parent.name for p in CASES} == set(TARGETS)


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_entry(path):
    expected = {"accept": "accepted", "reject": "rejected"}[path.name.split("-", 1)[0]]
    assert TARGETS[path.parent.name](path.read_bytes()) == expected
