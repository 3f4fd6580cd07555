"""Pure parsers of the image documents: round trips, every rejection rule, a fuzz test."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmstart.errors import (DuplicateEntry, FieldTooLarge, ImageFormatError, SizeMismatch,
                              UnsafeEntry, UnsupportedVersion)
from warmstart.imageformat.manifest import (encode_chunk_index, encode_manifest,
                                            encode_profile, parse_chunk_index, parse_manifest,
                                            parse_profile)
from warmstart.imageformat.model import (MT_BLOB, MT_CHUNK_INDEX, MT_PROFILE, MT_TOC, TOC,
                                         Chunk, Descriptor, Entry, Location, Manifest, Profile)
from warmstart.imageformat.toc import clean_path, encode_toc, parse_toc

H = hashlib.sha256(b"x").hexdigest()
H2 = hashlib.sha256(b"y").hexdigest()
D = "sha256:" + H


def sample_toc() -> TOC:
    return TOC((
        Entry(".", "dir", 0o755),
        Entry("bin", "symlink", 0o777, target="usr/bin"),
        Entry("dev", "dir", 0o755),
        Entry("dev/null", "char", 0o666, devmajor=1, devminor=3),
        Entry("usr", "dir", 0o755, mtime_ns=-5),
        Entry("usr/bin", "dir", 0o755, xattrs=(("user.k", b"\x00\xff"),)),
        Entry("usr/bin/abs", "symlink", 0o777, target="/usr/bin/p"),
        Entry("usr/bin/p", "reg", 0o4755, uid=7, gid=8, size=5, chunks=(Chunk(H, 2), Chunk(H2, 3))),
        Entry("usr/bin/q", "hardlink", 0o755, target="usr/bin/p"),
        Entry("usr/bin/up", "symlink", 0o777, target="../../bin/x"),
    ))


def toc_doc() -> dict:
    return json.loads(encode_toc(sample_toc()))


def enc(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_toc_round_trip_is_exact_and_canonical():
    toc = sample_toc()
    data = encode_toc(toc)
    assert parse_toc(data) == toc
    assert encode_toc(parse_toc(data)) == data
    assert json.loads(data)["entries"][5]["xattrs"] == {"user.k": "AP8="}


def test_schema_accepts_what_encoders_write():
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = os.path.join(os.path.dirname(__import__(
        "warmstart.imageformat").imageformat.__file__), "schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    m = Manifest(Descriptor(MT_TOC, D, 10), Descriptor(MT_CHUNK_INDEX, D, 10),
                 (Descriptor(MT_BLOB, D, 100),), Descriptor(MT_PROFILE, D, 5))
    for doc in (encode_toc(sample_toc()), encode_manifest(m),
                encode_chunk_index({H: Location(D, 0, 10)}), encode_profile(Profile(D, (H,)))):
        jsonschema.validate(json.loads(doc), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"mediaType": MT_TOC, "version": 2}, schema)


@pytest.mark.parametrize("path", ["/etc/passwd", "a/../../b", "a//b", "./a", "a/", "a/./b", ".."])
def test_unnormalized_or_escaping_paths_are_rejected(path):
    doc = toc_doc()
    doc["entries"].insert(1, {"path": path, "type": "dir", "mode": 0o755, "uid": 0, "gid": 0,
                              "mtime_ns": 0})
    with pytest.raises(UnsafeEntry):
        parse_toc(enc(doc))


@pytest.mark.parametrize("target", ["../../../etc/passwd", "../../../../x", "/../x", ""])
def test_symlinks_that_escape_the_root_are_rejected(target):
    doc = toc_doc()
    doc["entries"][9]["target"] = target  # usr/bin/up
    with pytest.raises(UnsafeEntry, match="usr/bin/up"):
        parse_toc(enc(doc))


@pytest.mark.parametrize("target", ["usr/bin/abs", "nope", "../usr/bin/p", "usr"])
def test_hardlinks_must_name_a_regular_file_inside(target):
    doc = toc_doc()
    doc["entries"][8]["target"] = target
    with pytest.raises(UnsafeEntry, match="usr/bin/q"):
        parse_toc(enc(doc))


def test_duplicate_and_out_of_order_entries_are_rejected():
    doc = toc_doc()
    doc["entries"].insert(3, dict(doc["entries"][2]))
    with pytest.raises(DuplicateEntry, match="dev"):
        parse_toc(enc(doc))
    doc = toc_doc()
    doc["entries"][1], doc["entries"][2] = doc["entries"][2], doc["entries"][1]
    with pytest.raises(DuplicateEntry):
        parse_toc(enc(doc))


def test_entry_below_a_symlink_or_without_parent_is_rejected():
    doc = toc_doc()
    doc["entries"].insert(2, {"path": "bin/sh", "type": "fifo", "mode": 0o644, "uid": 0,
                              "gid": 0, "mtime_ns": 0})
    with pytest.raises(UnsafeEntry, match="bin/sh"):
        parse_toc(enc(doc))
    doc = toc_doc()
    del doc["entries"][0]
    with pytest.raises(ImageFormatError, match="root"):
        parse_toc(enc(doc))


def test_size_must_equal_the_chunk_sum():
    doc = toc_doc()
    doc["entries"][7]["size"] = 6
    with pytest.raises(SizeMismatch, match="usr/bin/p"):
        parse_toc(enc(doc))
    doc = toc_doc()
    doc["entries"][7]["chunks"][0][1] = 0
    with pytest.raises(SizeMismatch):
        parse_toc(enc(doc))


def test_versions_unknown_fields_and_caps():
    doc = toc_doc()
    doc["version"] = 2
    with pytest.raises(UnsupportedVersion):
        parse_toc(enc(doc))
    doc = toc_doc()
    doc["entries"][1]["color"] = "red"
    with pytest.raises(ImageFormatError, match="color"):
        parse_toc(enc(doc))
    doc = toc_doc()
    doc["entries"][7]["uid"] = 1 << 40
    with pytest.raises(FieldTooLarge, match="uid"):
        parse_toc(enc(doc))
    doc = toc_doc()
    doc["entries"][2]["path"] = "d" * 300
    with pytest.raises(FieldTooLarge):
        parse_toc(enc(doc))
    doc = toc_doc()
    doc["entries"][7]["mode"] = True
    with pytest.raises(ImageFormatError, match="mode"):
        parse_toc(enc(doc))
    doc = toc_doc()
    doc["chunking"]["max"] = 1 << 30
    with pytest.raises(FieldTooLarge):
        parse_toc(enc(doc))
    with pytest.raises(ImageFormatError):
        parse_toc(b"[" * 100000)


def test_clean_path_for_layer_members():
    assert clean_path("./usr/bin/") == "usr/bin"
    assert clean_path("./") == "."
    for bad in ("/etc", "a/../b", "../x"):
        with pytest.raises(UnsafeEntry):
            clean_path(bad)


def test_manifest_index_profile_round_trip_and_checks():
    m = Manifest(Descriptor(MT_TOC, D, 10), Descriptor(MT_CHUNK_INDEX, D, 10),
                 (Descriptor(MT_BLOB, "sha256:" + H2, 100),), None, (("a", "b"),))
    assert parse_manifest(encode_manifest(m)) == m
    doc = json.loads(encode_manifest(m))
    doc["layers"].append(doc["layers"][1])
    with pytest.raises(ImageFormatError, match="twice"):
        parse_manifest(enc(doc))
    doc = json.loads(encode_manifest(m))
    doc["config"]["digest"] = "sha256:zz"
    with pytest.raises(ImageFormatError, match="digest"):
        parse_manifest(enc(doc))
    doc = json.loads(encode_manifest(m))
    doc["artifactType"] = "application/other"
    with pytest.raises(UnsupportedVersion):
        parse_manifest(enc(doc))
    blob = "sha256:" + H2
    idx = encode_chunk_index({H: Location(blob, 10, 20)})
    assert parse_chunk_index(idx, {blob: 30}).locations[H] == Location(blob, 10, 20)
    with pytest.raises(FieldTooLarge, match="outside blob"):
        parse_chunk_index(idx, {blob: 29})
    with pytest.raises(ImageFormatError, match="not listed"):
        parse_chunk_index(idx, {})
    p = Profile(D, (H, H2))
    assert parse_profile(encode_profile(p)) == p


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_tocs_raise_only_image_format_errors(data):
    raw = bytearray(encode_toc(sample_toc()))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        toc = parse_toc(bytes(raw))
    except ImageFormatError:
        return
    assert toc.entries[0].path == "."  # whatever parses is still a valid tree


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_to_every_parser(raw):
    for fn in (parse_toc, parse_manifest, parse_profile, lambda b: parse_chunk_index(b, {})):
        try:
            fn(raw)
        except ImageFormatError:
            pass
