"""Convert from rootfs folders, umoci-built OCI layouts and docker-archives; layer rules."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from imageformat_helpers import BLOB, exact_policy, snapshot

from warmstart.errors import DigestMismatch, UnsafeEntry
from warmstart.imageformat.convert import convert
from warmstart.imageformat.layers import Tree, apply_layer
from warmstart.imageformat.pull import pull
from warmstart.imageformat.store import ImageStore


def store(tmp_path, name="store") -> ImageStore:
    return ImageStore.open(str(tmp_path / name))


def test_rootfs_round_trip_and_determinism(py_rootfs, tmp_path):
    a = convert(py_rootfs, store(tmp_path, "a"), "v1", blob_size=BLOB)
    b = convert(py_rootfs, store(tmp_path, "b"), "v1", blob_size=BLOB)
    assert a.digest == b.digest and a.toc_digest == b.toc_digest
    again = convert(py_rootfs, store(tmp_path, "a"), "v1", blob_size=BLOB)
    assert again.digest == a.digest and again.new_chunks == 0 and again.new_bytes == 0
    s = store(tmp_path, "a")
    assert len(s.open_image("v1").manifest.blobs) >= 3
    pull(s, "v1", str(tmp_path / "out"), policy=exact_policy())
    assert snapshot(str(tmp_path / "out")) == snapshot(py_rootfs)


def test_oci_layout_round_trip_matches_umoci_unpack(oci_layout, umoci_unpacked, tmp_path):
    s = store(tmp_path)
    for tag in ("v1", "v2"):
        convert(f"{oci_layout}:{tag}", s, tag, blob_size=BLOB)
        out = str(tmp_path / f"pulled-{tag}")
        pull(s, tag, out, policy=exact_policy())
        assert snapshot(out) == snapshot(umoci_unpacked[tag]), tag
    v2 = snapshot(str(tmp_path / "pulled-v2"))
    assert "old/deep/gone.txt" not in v2 and "old/fresh.txt" in v2  # whiteouts applied
    assert v2["data/suid"][1] == 0o4755


def test_second_version_uploads_about_the_change(oci_layout, tmp_path):
    s = store(tmp_path)
    v1 = convert(f"{oci_layout}:v1", s, "v1", blob_size=BLOB)
    v2 = convert(f"{oci_layout}:v2", s, "v2", blob_size=BLOB)
    assert v2.reused_chunks > 10 * v2.new_chunks
    # v2 adds 512 KiB of random bytes and edits one chunk of a random file and a few small files
    assert v2.new_bytes < 1.5 * (512 << 10) + 3 * (1 << 20) and v2.new_bytes < v1.new_bytes / 5


def test_docker_archive_gives_the_same_toc_as_the_oci_layout(oci_layout, docker_archive,
                                                             tmp_path):
    a = convert(f"{oci_layout}:v2", store(tmp_path, "a"), "v2", blob_size=BLOB)
    b = convert(docker_archive, store(tmp_path, "b"), "v2", blob_size=BLOB)
    assert a.toc_digest == b.toc_digest


def test_tampered_layer_is_refused(oci_layout, tmp_path):
    import shutil
    layout = str(tmp_path / "layout")
    shutil.copytree(oci_layout, layout)
    blobs = os.path.join(layout, "blobs/sha256")
    biggest = max(os.listdir(blobs), key=lambda n: os.path.getsize(os.path.join(blobs, n)))
    with open(os.path.join(blobs, biggest), "r+b") as f:
        f.seek(5000)
        f.write(b"tampered")
    with pytest.raises(DigestMismatch, match="layer"):
        convert(f"{layout}:v1", store(tmp_path), "v1")


# --- layer rules on hand-made tars -----------------------------------------------------

def make_tar(path, members) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, arg in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "file":
                ti.size, ti.mode = len(arg), 0o644
                tf.addfile(ti, io.BytesIO(arg))
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
                tf.addfile(ti)
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
                tf.addfile(ti)
    return str(path)


def test_whiteouts_opaque_dirs_and_hardlinks(tmp_path):
    tree = Tree()
    apply_layer(tree, make_tar(tmp_path / "l1.tar", [
        ("./a/", "dir", None), ("./a/x", "file", b"x1"), ("./a/sub/", "dir", None),
        ("./a/sub/y", "file", b"y"), ("b/f", "file", b"f"), ("b/link", "hardlink", "b/f"),
        ("c/keep", "file", b"k")]))
    assert tree.nodes["b"].type == "dir"  # implicit parent
    apply_layer(tree, make_tar(tmp_path / "l2.tar", [
        ("a/", "dir", None), ("a/new", "file", b"n"), ("a/.wh..wh..opq", "file", b""),
        ("b/.wh.f", "file", b""), ("c/.wh.nothing", "file", b"")]))
    assert sorted(p for p in tree.nodes if p.startswith("a")) == ["a", "a/new"]
    assert "b/f" not in tree.nodes
    assert tree.nodes["b/link"].type == "reg"  # the hard link keeps the content
    assert tree.nodes["c/keep"].type == "reg"
    apply_layer(tree, make_tar(tmp_path / "l3.tar", [("c", "file", b"now a file")]))
    assert tree.nodes["c"].type == "reg" and "c/keep" not in tree.nodes


@pytest.mark.parametrize("members,needle", [
    ([("../evil", "file", b"x")], "'..'"),
    ([("/etc/passwd", "file", b"x")], "absolute"),
    ([("a/", "dir", None), ("a/l", "symlink", "../../etc")], "escapes"),
    ([("l", "hardlink", "missing")], "hard link"),
    ([("l", "symlink", "/etc"), ("l/passwd", "file", b"x")], "not a directory"),
])
def test_malicious_layers_are_refused(tmp_path, members, needle):
    with pytest.raises(UnsafeEntry, match=needle):
        apply_layer(Tree(), make_tar(tmp_path / "bad.tar", members))


def test_converted_image_lives_beside_the_original_in_one_oci_layout(oci_layout, tmp_path):
    import shutil
    import subprocess
    layout = str(tmp_path / "layout")
    shutil.copytree(oci_layout, layout)
    with ImageStore.open(layout) as s:
        r = convert(f"{layout}:v1", s, "v1-warmstart", blob_size=BLOB)
        assert set(s.tags()) == {"v1", "v2", "v1-warmstart"}
        s.gc()  # may drop what umoci itself left unreferenced, never the original images
        assert s.open_image("v1-warmstart").digest == r.digest
    for tag in ("v1", "v2"):
        out = subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}",
                              str(tmp_path / f"b-{tag}")], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
    pull(ImageStore.open(layout), "v1-warmstart", str(tmp_path / "pulled"))
    assert os.path.isfile(tmp_path / "pulled/usr/bin/python3.11")


def test_convert_push_and_pull_report_done_and_total(py_rootfs, tmp_path):
    """One progress protocol (warmstart.storage.progress): cumulative `(done, total)`; pull and
    push know their total ahead and end at it, convert streams layers and reports total 0."""
    from warmstart.imageformat.convert import push

    def recorder():
        calls = []
        return calls, lambda done, total: calls.append((done, total))

    converted, on_convert = recorder()
    with ImageStore.open(str(tmp_path / "a")) as a, ImageStore.open(str(tmp_path / "b")) as b:
        convert(py_rootfs, a, "v1", blob_size=BLOB, progress=on_convert)
        chunks = a.open_image("v1").toc.unique_chunks()
        pushed, on_push = recorder()
        push(a, "v1", b, "v1", progress=on_push)
        pulled, on_pull = recorder()
        pull(b, "v1", str(tmp_path / "out"), progress=on_pull, policy=exact_policy())
    size = sum(c.size for c in chunks)
    for calls in (converted, pushed, pulled):
        done = [d for d, _ in calls]
        assert calls and done == sorted(done)  # cumulative, never deltas
    assert {t for _, t in converted} == {0} and converted[-1][0] >= size
    assert pushed[-1] == (size, size) and {t for _, t in pushed} == {size}
    assert pulled[-1] == (size, size) and {t for _, t in pulled} == {size}
