"""Property tests for every parser of untrusted bytes beyond the safetensors header (which
tests/loader/test_header.py fuzzes): the shard index, the image TOC, manifest, chunk index and
profile, and the layer-tar / whiteout handling of conversion.

Each parser either returns something that satisfies its documented invariants or raises a
named error from warmstart.errors; any other exception (or a hang, which hypothesis reports
as a deadline miss in the slow variant) is a bug. Inputs are built two ways: raw bytes, and
valid documents with one structural mutation, which reaches far deeper than raw bytes.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets
from warmstart.imageformat.manifest import encode_chunk_index, encode_manifest, encode_profile
from warmstart.imageformat.model import (MT_BLOB, MT_CHUNK_INDEX, MT_PROFILE, MT_TOC, TOC,
                                         Chunk, Descriptor, Entry, Location, Manifest, Profile)
from warmstart.imageformat.toc import encode_toc

QUICK = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(max_examples=5000, deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
ODD_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", ".", "..", "/", "a/../b", "/abs", "a\\b", "a\x00b", "\ud800",
                     "a//b", "./a", "a/", "\udcff", "x" * 300]))
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                      st.floats(allow_nan=False), ODD_TEXT)
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(ODD_TEXT, inner, max_size=4)), max_leaves=12)


# --- structural mutation of a valid JSON document --------------------------------------

def _containers(doc, path=()):
    """Every (path, container) in a JSON tree."""
    if isinstance(doc, (dict, list)):
        yield path, doc
        items = doc.items() if isinstance(doc, dict) else enumerate(doc)
        for k, v in items:
            yield from _containers(v, path + (k,))


@st.composite
def mutated(draw, doc):
    """`doc` with one random edit: a value replaced, a key dropped or added, a list item
    duplicated or removed."""
    doc = copy.deepcopy(doc)
    places = list(_containers(doc))
    _, box = draw(st.sampled_from(places))
    op = draw(st.sampled_from(["replace", "drop", "add", "duplicate"]))
    keys = list(box) if isinstance(box, dict) else list(range(len(box)))
    if op == "add" or not keys:
        if isinstance(box, dict):
            box[draw(ODD_TEXT)] = draw(JSON_ANY)
        else:
            box.insert(draw(st.integers(0, len(box))), draw(JSON_ANY))
        return doc
    key = draw(st.sampled_from(keys))
    if op == "replace":
        box[key] = draw(JSON_ANY)
    elif op == "drop":
        del box[key]
    elif isinstance(box, list):
        box.insert(key, copy.deepcopy(box[key]))
    else:
        box[draw(ODD_TEXT)] = copy.deepcopy(box[key])
    return doc


def as_bytes(doc) -> bytes:
    return json.dumps(doc).encode()


# --- the sharded-checkpoint index -------------------------------------------------------

VALID_INDEX = {"metadata": {"total_size": 48},
               "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                              "b.weight": "model-00002-of-00002.safetensors",
                              "c.bias": "model-00001-of-00002.safetensors"}}


check_index = targets.index


@QUICK
@given(st.binary(max_size=300))
def test_index_random_bytes(raw):
    check_index(raw)


@QUICK
@given(mutated(VALID_INDEX))
def test_index_mutations(doc):
    check_index(as_bytes(doc))


@QUICK
@given(st.dictionaries(ODD_TEXT, ODD_TEXT, max_size=6))
def test_index_any_shard_names(weight_map):
    check_index(as_bytes({"weight_map": weight_map}))


# --- image documents --------------------------------------------------------------------

def _chunk(i: int, size: int = 10) -> Chunk:
    return Chunk(f"{i:064x}", size)


VALID_TOC = TOC((
    Entry(".", "dir", 0o755),
    Entry("bin", "dir", 0o755, uid=1, gid=2, mtime_ns=5),
    Entry("bin/sh", "reg", 0o755, size=30, chunks=(_chunk(1), _chunk(2, 20)),
          xattrs=(("user.a", b"\x00\xff"),)),
    Entry("bin/sh2", "hardlink", 0o755, target="bin/sh"),
    Entry("dev", "dir", 0o755),
    Entry("dev/null", "char", 0o666, devmajor=1, devminor=3),
    Entry("etc", "dir", 0o755),
    Entry("etc/fifo", "fifo", 0o600),
    Entry("etc/link", "symlink", 0o777, target="../bin/sh"),
    Entry("etc/root", "symlink", 0o777, target="/bin"),
))
VALID_TOC_DOC = json.loads(encode_toc(VALID_TOC))


check_toc = targets.toc


@QUICK
@given(st.binary(max_size=300))
def test_toc_random_bytes(raw):
    check_toc(raw)


@QUICK
@given(mutated(VALID_TOC_DOC))
def test_toc_mutations(doc):
    check_toc(as_bytes(doc))


@pytest.mark.slow
@LONG
@given(mutated(VALID_TOC_DOC))
def test_toc_mutations_long(doc):
    check_toc(as_bytes(doc))


BLOBS = targets.BLOBS
VALID_MANIFEST = Manifest(
    Descriptor(MT_TOC, "sha256:" + "c" * 64, 123),
    Descriptor(MT_CHUNK_INDEX, "sha256:" + "d" * 64, 77),
    tuple(Descriptor(MT_BLOB, d, n) for d, n in BLOBS.items()),
    Descriptor(MT_PROFILE, "sha256:" + "e" * 64, 9),
    (("org.opencontainers.image.ref.name", "v1"),))
VALID_MANIFEST_DOC = json.loads(encode_manifest(VALID_MANIFEST))
VALID_INDEX_DOC = json.loads(encode_chunk_index({
    "1" * 64: Location("sha256:" + "a" * 64, 0, 400),
    "2" * 64: Location("sha256:" + "a" * 64, 400, 600),
    "3" * 64: Location("sha256:" + "b" * 64, 0, 50)}))
VALID_PROFILE_DOC = json.loads(encode_profile(Profile("sha256:" + "c" * 64,
                                                      ("1" * 64, "3" * 64))))


check_manifest, check_chunk_index, check_profile = (
    targets.manifest, targets.chunk_index, targets.profile)


@QUICK
@given(st.binary(max_size=200))
def test_image_documents_random_bytes(raw):
    check_manifest(raw)
    check_chunk_index(raw)
    check_profile(raw)


@QUICK
@given(mutated(VALID_MANIFEST_DOC))
def test_manifest_mutations(doc):
    check_manifest(as_bytes(doc))


@QUICK
@given(mutated(VALID_INDEX_DOC))
def test_chunk_index_mutations(doc):
    check_chunk_index(as_bytes(doc))


@QUICK
@given(mutated(VALID_PROFILE_DOC))
def test_profile_mutations(doc):
    check_profile(as_bytes(doc))


# --- layer tars and whiteouts -----------------------------------------------------------

NAME_PART = st.sampled_from(["a", "b", "c", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh.", "..",
                             ".", ""])
TAR_NAME = st.builds(lambda lead, parts: lead + "/".join(parts),
                     st.sampled_from(["", "", "", "./", "/"]),
                     st.lists(NAME_PART, min_size=1, max_size=4))
TAR_TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
             tarfile.FIFOTYPE, tarfile.CHRTYPE]
MEMBER = st.fixed_dictionaries({
    "name": TAR_NAME, "type": st.sampled_from(TAR_TYPES), "link": TAR_NAME,
    "size": st.integers(0, 3), "mode": st.integers(0, 0o7777),
    "uid": st.one_of(st.integers(0, 70000), st.integers(0, 1 << 40)),
    "mtime": st.one_of(st.integers(0, 1 << 33), st.floats(-1e12, 1e19, allow_nan=False)),
    "dev": st.integers(0, 1 << 20),
    "pax": st.dictionaries(st.sampled_from(["SCHILY.xattr.user.x", "SCHILY.xattr.",
                                            "SCHILY.xattr." + "n" * 300, "mtime", "uid"]),
                           st.sampled_from(["1", "v", "", "inf", "-5", "1e30", "x" * 70000]),
                           max_size=2),
})


def write_tar(members: list[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m["name"])
            info.type, info.mode, info.uid, info.gid = m["type"], m["mode"], m["uid"], m["uid"]
            info.mtime, info.devmajor, info.devminor = m["mtime"], m["dev"], m["dev"]
            info.pax_headers = dict(m["pax"])
            if m["type"] in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = m["link"]
            data = None
            if m["type"] == tarfile.REGTYPE:
                info.size = m["size"]
                data = io.BytesIO(b"x" * m["size"])
            tf.addfile(info, data)
    return buf.getvalue()


check_layers = targets.layers


@QUICK
@given(st.lists(st.lists(MEMBER, max_size=6), min_size=1, max_size=3))
def test_layer_tars_and_whiteouts(layers):
    check_layers([write_tar(m) for m in layers])


@pytest.mark.slow
@LONG
@given(st.lists(st.lists(MEMBER, max_size=8), min_size=1, max_size=3))
def test_layer_tars_and_whiteouts_long(layers):
    check_layers([write_tar(m) for m in layers])


@QUICK
@given(st.binary(max_size=2048), st.integers(0, 2047), st.binary(min_size=1, max_size=8))
def test_layer_tar_bytes_corrupted(blob, at, patch):
    """A valid tar with a few bytes overwritten, or random bytes: named error or a tree."""
    good = write_tar([{"name": "a", "type": tarfile.REGTYPE, "link": "", "size": 3,
                       "mode": 0o644, "uid": 0, "mtime": 0, "dev": 0, "pax": {}},
                      {"name": "b/.wh.c", "type": tarfile.REGTYPE, "link": "", "size": 0,
                       "mode": 0o644, "uid": 0, "mtime": 0, "dev": 0, "pax": {}}])
    at %= len(good)
    check_layers([good[:at] + patch + good[at + len(patch):]])
    check_layers([blob])


# --- input images: OCI layout index/manifest and docker-archive manifest.json -----------

def _blob(layout, data: bytes) -> str:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest


LAYER = write_tar([{"name": "a", "type": tarfile.REGTYPE, "link": "", "size": 2,
                    "mode": 0o644, "uid": 0, "mtime": 0, "dev": 0, "pax": {}}])
VALID_OCI_MANIFEST = {"schemaVersion": 2,
                      "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"digest": "sha256:" + "c" * 64, "size": 2},
                      "layers": [{"digest": "LAYER", "size": len(LAYER),
                                  "mediaType": "application/vnd.oci.image.layer.v1.tar"}]}
VALID_OCI_INDEX = {"schemaVersion": 2, "manifests": [
    {"digest": "MANIFEST", "size": 1,
     "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}


def check_oci_layout(index_doc, manifest_doc, ref) -> None:
    """convert's reading of an OCI layout: layer tars, or a named warmstart error."""
    import tempfile
    from pathlib import Path

    from warmstart.errors import WarmstartError
    from warmstart.imageformat.decompress import Budget, LayerLimits, open_layer
    from warmstart.imageformat.sources import open_source

    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout"
        layer = _blob(layout, LAYER)
        text = json.dumps(manifest_doc).replace('"LAYER"', json.dumps(layer))
        manifest = _blob(layout, text.encode())
        (layout / "index.json").write_text(
            json.dumps(index_doc).replace('"MANIFEST"', json.dumps(manifest)))
        try:
            with open_source(str(layout) + (f":{ref}" if ref else ""), "oci") as src:
                tars = []
                for layer in src.layers:
                    with open_layer(layer, Budget(LayerLimits())) as tar:
                        tars.append(tar.read())
        except WarmstartError:
            return
        assert tars == [LAYER] * len(tars)


@QUICK
@given(mutated(VALID_OCI_INDEX), st.sampled_from([None, "v1", "v2"]))
def test_oci_layout_index_mutations(index_doc, ref):
    check_oci_layout(index_doc, VALID_OCI_MANIFEST, ref)


@QUICK
@given(mutated(VALID_OCI_MANIFEST))
def test_oci_layout_manifest_mutations(manifest_doc):
    check_oci_layout(VALID_OCI_INDEX, manifest_doc, None)


VALID_ARCHIVE = [{"Config": "config.json", "RepoTags": ["test/image:v1"],
                  "Layers": ["layer.tar"]}]


@QUICK
@given(mutated(VALID_ARCHIVE), mutated({"rootfs": {"type": "layers", "diff_ids": ["ID"]}}),
       st.sampled_from([None, "test/image:v1"]))
def test_docker_archive_manifest_mutations(manifest_doc, config_doc, ref):
    import hashlib
    import tempfile

    from warmstart.errors import WarmstartError
    from warmstart.imageformat.decompress import Budget, LayerLimits, open_layer
    from warmstart.imageformat.sources import open_source

    diff_id = "sha256:" + hashlib.sha256(LAYER).hexdigest()
    members = {"manifest.json": json.dumps(manifest_doc).encode(),
               "config.json": json.dumps(config_doc).replace('"ID"', json.dumps(diff_id))
               .encode(), "layer.tar": LAYER}
    with tempfile.TemporaryDirectory() as tmp:
        archive = f"{tmp}/image.tar"
        with tarfile.open(archive, "w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        try:
            with open_source(archive + (f":{ref}" if ref else ""), "docker-archive") as src:
                for layer in src.layers:
                    with open_layer(layer, Budget(LayerLimits())) as tar:
                        assert tar.read() == LAYER
        except WarmstartError:
            pass
