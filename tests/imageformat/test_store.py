"""Conformance suite every store passes (local folder, S3 on localbucket, S3 on nanio):
push with deduplication, pull, tags, garbage collection and tamper detection."""

from __future__ import annotations

import pytest
from imageformat_helpers import BLOB, exact_policy, snapshot

from warmstart.errors import DigestMismatch, NotFound
from warmstart.imageformat._aio import run_sync
from warmstart.imageformat.convert import convert, push
from warmstart.imageformat.pull import pull
from warmstart.imageformat.store import ImageStore, blob_key


@pytest.fixture(scope="module")
def source(tmp_path_factory, py_rootfs, py_rootfs_v2):
    """A local store holding v1 and v2 of the test image."""
    s = ImageStore.open(str(tmp_path_factory.mktemp("src") / "store"))
    convert(py_rootfs, s, "v1", blob_size=BLOB)
    convert(py_rootfs_v2, s, "v2", blob_size=BLOB)
    return s


@pytest.fixture
def dest(store_uri):
    uri, cfg = store_uri
    s = ImageStore.open(uri, cfg)
    yield s
    s.close()


def blob_bytes(s: ImageStore) -> int:
    async def go():
        keys = await s.backend.list("blobs/")
        return sum([len(await s.backend.get(k)) for k in keys])
    return run_sync(go())


def test_push_pull_round_trip(source, dest, py_rootfs, tmp_path):
    r = push(source, "v1", dest, "v1", blob_size=BLOB)
    assert r.toc_digest == source.open_image("v1").toc_digest
    assert r.digest == source.tags()["v1"]  # same packing into an empty store
    assert dest.tags() == {"v1": r.digest}
    pull(dest, "v1", str(tmp_path / "out"), policy=exact_policy())
    assert snapshot(str(tmp_path / "out")) == snapshot(py_rootfs)
    pinned = dest.open_image(f"v1@{r.digest}")
    assert pinned.digest == r.digest


def test_second_version_push_uploads_only_new_chunks(source, dest):
    r1 = push(source, "v1", dest, "v1", blob_size=BLOB)
    before = blob_bytes(dest)
    r2 = push(source, "v2", dest, "v2", blob_size=BLOB)
    grown = blob_bytes(dest) - before
    assert r2.reused_chunks > 10 * r2.new_chunks
    assert r2.new_bytes < r1.new_bytes / 5
    m = dest.open_image("v2").manifest
    docs = m.toc.size + m.chunk_index.size + (4 << 10)  # TOC, chunk index, manifest
    assert r2.new_bytes <= grown < r2.new_bytes + docs  # new blobs and documents only
    again = push(source, "v2", dest, "v2", blob_size=BLOB)
    assert again.new_bytes == 0 and again.digest == r2.digest


def test_gc_deletes_only_unreferenced_blobs(source, dest, py_rootfs_v2, tmp_path):
    push(source, "v1", dest, "v1", blob_size=BLOB)
    push(source, "v2", dest, "v2", blob_size=BLOB)
    assert dest.gc() == []
    run_sync(dest.backend.put("index.json", b'{"schemaVersion":2,"manifests":[]}'))
    push(source, "v2", dest, "v2", blob_size=BLOB)  # v1 is untagged now
    doomed = dest.gc(dry_run=True)
    assert doomed and dest.gc() == doomed and dest.gc() == []
    pull(dest, "v2", str(tmp_path / "out"), policy=exact_policy())
    assert snapshot(str(tmp_path / "out")) == snapshot(py_rootfs_v2)
    with pytest.raises(NotFound):
        dest.open_image("v1")


def _corrupt(s: ImageStore, digest: str, at: int = 100) -> None:
    async def go():
        key = blob_key(digest)
        data = bytearray(await s.backend.get(key))
        data[at % len(data)] ^= 0xFF
        await s.backend.put(key, bytes(data))
    run_sync(go())


def test_tampered_chunk_blob_toc_and_manifest_are_detected(source, dest, tmp_path):
    r = push(source, "v1", dest, "v1", blob_size=BLOB)
    image = dest.open_image("v1")
    _corrupt(dest, image.manifest.blobs[0].digest, at=image.manifest.blobs[0].size // 2)
    with pytest.raises(DigestMismatch, match="chunk"):
        pull(dest, "v1", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.partial-*"))
    _corrupt(dest, image.toc_digest)
    with pytest.raises(DigestMismatch, match="TOC"):
        dest.open_image("v1")
    _corrupt(dest, r.digest)
    with pytest.raises(DigestMismatch, match="manifest"):
        dest.open_image("v1")


def test_push_out_of_this_store(source, dest, py_rootfs_v2, tmp_path):
    push(source, "v2", dest, "v2", blob_size=BLOB)
    other = ImageStore.open(str(tmp_path / "other"))
    r = push(dest, "v2", other, "v2")  # coalesced range reads out of `dest`
    assert r.toc_digest == source.open_image("v2").toc_digest and r.reused_chunks == 0
    pull(other, "v2", str(tmp_path / "out"), policy=exact_policy())
    assert snapshot(str(tmp_path / "out")) == snapshot(py_rootfs_v2)
