"""Fuzz targets: one function per parser of untrusted bytes, shared by the hypothesis tests,
the atheris driver (fuzz_parsers.py) and the corpus replay.

Each target takes raw bytes and returns "accepted" or "rejected". A rejection must be the
parser's named error (a `FormatError` from warmstart.errors: the image format's errors are
subclasses of it); anything accepted must satisfy the parser's invariants, checked with
`assert`. Any other exception escaping a target is a bug.
"""

from __future__ import annotations

import os
import tempfile

from warmstart.errors import FormatError, ImageFormatError, ShardIndexError
from warmstart.imageformat.layers import Tree, apply_layer
from warmstart.imageformat.manifest import (encode_manifest, encode_profile,
                                            parse_chunk_index, parse_manifest, parse_profile)
from warmstart.imageformat.model import TOC, Entry
from warmstart.imageformat.toc import (check_path, check_symlink, check_tree,
                                       encode_checked_toc, encode_toc, parse_toc)
from warmstart.loader.header import parse_header
from warmstart.loader.index import parse_index

INDEX_NAME = "s3://bucket/model.safetensors.index.json"
BLOBS = {"sha256:" + "a" * 64: 1000, "sha256:" + "b" * 64: 50}


def header(raw: bytes) -> str:
    try:
        h = parse_header(raw, len(raw), "fuzz.safetensors")
    except FormatError as exc:
        assert "fuzz.safetensors" in str(exc)
        return "rejected"
    assert sum(t.nbytes for t in h.tensors) == len(raw) - h.data_start
    return "accepted"


def index(raw: bytes) -> str:
    try:
        idx = parse_index(raw, INDEX_NAME)
    except ShardIndexError as exc:
        assert INDEX_NAME in str(exc)
        return "rejected"
    assert idx.weight_map and set(idx.shards) == set(idx.weight_map.values())
    for shard in idx.shards:
        # an accepted shard name is a plain relative path that the OS can open
        assert not shard.startswith("/") and ".." not in shard.split("/")
        shard.encode("utf-8")
    return "accepted"


def toc(raw: bytes) -> str:
    try:
        t = parse_toc(raw)
    except ImageFormatError:
        return "rejected"
    check_tree(t.entries)
    for e in t.entries:
        check_path(e.path)
        if e.type == "symlink":
            check_symlink(e.path, e.target)
        if e.type == "reg":
            assert sum(c.size for c in e.chunks) == e.size
    assert parse_toc(encode_toc(t)) == t  # what is accepted round-trips exactly
    return "accepted"


def manifest(raw: bytes) -> str:
    try:
        m = parse_manifest(raw)
    except ImageFormatError:
        return "rejected"
    assert parse_manifest(encode_manifest(m)) == m
    assert len({b.digest for b in m.blobs}) == len(m.blobs)
    return "accepted"


def chunk_index(raw: bytes) -> str:
    try:
        ci = parse_chunk_index(raw, BLOBS)
    except ImageFormatError:
        return "rejected"
    for loc in ci.locations.values():
        assert 0 <= loc.offset and 0 < loc.csize and loc.offset + loc.csize <= BLOBS[loc.blob]
    return "accepted"


def profile(raw: bytes) -> str:
    try:
        p = parse_profile(raw)
    except ImageFormatError:
        return "rejected"
    assert parse_profile(encode_profile(p)) == p
    return "accepted"


def toc_entries(tree: Tree) -> tuple[Entry, ...]:
    """What convert writes for a tree (file content left out: it is chunked separately)."""
    out = []
    for path in tree.sorted_paths():
        n = tree.nodes[path]
        out.append(Entry(path, n.type, n.mode, n.uid, n.gid, n.mtime_ns, 0, n.target,
                         n.devmajor, n.devminor, tuple(sorted(n.xattrs.items()))))
    return tuple(out)


def layers(tars: list[bytes]) -> str:
    """Applies layer tars in order as convert does, then checks the tree and its TOC."""
    tree = Tree()
    with tempfile.TemporaryDirectory(prefix="warmstart-fuzz-") as tmp:
        for i, blob in enumerate(tars):
            path = os.path.join(tmp, f"layer{i}.tar")
            with open(path, "wb") as f:
                f.write(blob)
            try:
                apply_layer(tree, path)
            except ImageFormatError:
                return "rejected"
    for path, node in tree.nodes.items():
        check_path(path)
        if path != ".":
            parent = os.path.dirname(path) or "."
            assert tree.nodes[parent].type == "dir"
            assert os.path.basename(path) in tree.children[parent]
        if node.type == "hardlink":
            assert tree.nodes[node.target].type == "reg"
        if node.type == "symlink":
            check_symlink(path, node.target)
    # convert refuses (named error) a tree whose TOC would not parse back, and what it
    # accepts reads back exactly: it never stores an image nobody can open
    t = TOC(toc_entries(tree))
    try:
        check_tree(t.entries)
        data = encode_checked_toc(t)
    except ImageFormatError:
        return "rejected"
    assert parse_toc(data) == t
    return "accepted"


def layer(raw: bytes) -> str:
    return layers([raw])


TARGETS = {"header": header, "index": index, "toc": toc, "manifest": manifest,
           "chunk_index": chunk_index, "profile": profile, "layer": layer}
