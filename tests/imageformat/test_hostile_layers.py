"""Hostile layers: decompression bombs, whiteouts of a layer's own entries, whiteouts that
name no entry, and the privileges a full pull may write into a host folder."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile

import pytest
from imageformat_helpers import write_oci_layout

from warmstart.cli import main
from warmstart.errors import LayerTooLarge, UnsafeEntry
from warmstart.imageformat.convert import convert
from warmstart.imageformat.layers import Tree, apply_layer
from warmstart.imageformat.pull import PullPolicy, PullReport, pull
from warmstart.imageformat.decompress import LayerLimits
from warmstart.imageformat.store import ImageStore


def tar_bytes(members) -> bytes:
    """members: (name, kind, arg, extra) with kind dir/file/char/whiteout."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, arg, *extra in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1000
            opts = extra[0] if extra else {}
            ti.mode = opts.get("mode", 0o755 if kind == "dir" else 0o644)
            ti.pax_headers = opts.get("pax", {})
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind == "char":
                ti.type, (ti.devmajor, ti.devminor) = tarfile.CHRTYPE, arg
                tf.addfile(ti)
            else:
                ti.size = len(arg)
                tf.addfile(ti, io.BytesIO(arg))
    return buf.getvalue()


def bomb(total: int, piece: int = 64 << 20) -> bytes:
    """A gzip layer of about total/1000 bytes: a tar header for one `total`-byte file, then
    gzip members of zeros (concatenated members are one gzip stream)."""
    ti = tarfile.TarInfo("big")
    ti.size = total
    one = gzip.compress(b"\0" * piece, 9)
    return gzip.compress(ti.tobuf(format=tarfile.GNU_FORMAT)) + one * (total // piece)


def test_a_10_gib_gzip_bomb_stops_early_and_leaves_nothing(tmp_path):
    layer = bomb(10 << 30)
    assert len(layer) < 12 << 20
    source = write_oci_layout(str(tmp_path / "layout"), [layer])
    work = tmp_path / "work"
    work.mkdir()
    seen = []
    with ImageStore.open(str(tmp_path / "store")) as s:
        with pytest.raises(LayerTooLarge, match=r"layer 0: decompresses more than 100x"):
            convert(source, s, "v1", workdir=str(work), progress=lambda done, _total: seen.append(done))
        assert s.tags() == {}
    assert os.listdir(work) == []
    # the ratio is judged once 256 MiB came out; the chunker saw not much more than that
    assert seen[-1] <= LayerLimits().ratio_floor + (16 << 20)


def test_the_image_wide_byte_limit_counts_every_layer(tmp_path):
    data = os.urandom(6 << 20)  # incompressible: only the byte limit can stop it
    layers = [gzip.compress(tar_bytes([(f"f{i}", "file", data)]), 1) for i in range(2)]
    source = write_oci_layout(str(tmp_path / "layout"), layers)
    limits = LayerLimits(max_bytes=8 << 20)
    with ImageStore.open(str(tmp_path / "store")) as s:
        with pytest.raises(LayerTooLarge, match=r"layer 1: .* more than 8388608 bytes"):
            convert(source, s, "v1", limits=limits, workdir=str(tmp_path))
        r = convert(source, s, "v1", limits=LayerLimits(max_bytes=16 << 20))
        assert r.new_chunks > 0 and s.tags() == {"v1": r.digest}


def test_cli_limits_fail_with_one_line(tmp_path, capsys):
    layer = gzip.compress(tar_bytes([("z", "file", b"\0" * (4 << 20))]))
    source = write_oci_layout(str(tmp_path / "layout"), [layer])
    rc = main(["image", "convert", source, "--store", str(tmp_path / "s"), "--tag", "v1",
               "--max-image-bytes", "1M"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "more than 1048576 bytes" in err


@pytest.mark.parametrize("order", ["entry first", "whiteout first"])
def test_a_whiteout_never_deletes_its_own_layer(tmp_path, order):
    tree = Tree()
    apply_layer(tree, io.BytesIO(tar_bytes([
        ("d/", "dir", None), ("d/x", "file", b"lower"), ("d/sub/", "dir", None),
        ("d/sub/old", "file", b"o")])))
    upper = [("d/x", "file", b"upper"), ("d/sub/new", "file", b"n")]
    outs = [("d/.wh.x", "file", b""), ("d/.wh.sub", "file", b"")]
    apply_layer(tree, io.BytesIO(tar_bytes(upper + outs if order == "entry first"
                                           else outs + upper)))
    assert tree.nodes["d/x"].size == len(b"upper")  # this layer's d/x stays
    assert "d/sub/new" in tree.nodes and "d/sub/old" not in tree.nodes
    apply_layer(tree, io.BytesIO(tar_bytes([("d/.wh.x", "file", b"")])))
    assert "d/x" not in tree.nodes  # a later layer's whiteout does delete it


def test_same_layer_whiteout_in_a_converted_image(tmp_path):
    """The case found outside: `d/x` then `d/.wh.x` in one layer keeps `d/x`."""
    layer = gzip.compress(tar_bytes([("d/", "dir", None), ("d/x", "file", b"kept"),
                                     ("d/.wh.x", "file", b"")]))
    source = write_oci_layout(str(tmp_path / "layout"), [layer])
    with ImageStore.open(str(tmp_path / "store")) as s:
        convert(source, s, "v1")
        pull(s, "v1", str(tmp_path / "out"))
    assert (tmp_path / "out/d/x").read_bytes() == b"kept"


@pytest.mark.parametrize("name", ["d/.wh.", "d/.wh.."])
def test_whiteouts_that_name_no_entry_are_refused(tmp_path, name):
    tree = Tree()
    apply_layer(tree, io.BytesIO(tar_bytes([("d/", "dir", None), ("d/f", "file", b"f")])))
    with pytest.raises(UnsafeEntry, match="whiteout names no entry"):
        apply_layer(tree, io.BytesIO(tar_bytes([(name, "file", b"")])))
    assert "d/f" in tree.nodes


# --- what a full pull writes into a host folder -----------------------------------------

# security.capability, VFS_CAP_REVISION_2 with the effective flag: cap_net_raw+ep
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


@pytest.fixture
def privileged_image(tmp_path):
    layer = gzip.compress(tar_bytes([
        ("dev/", "dir", None), ("dev/null", "char", (1, 3)),
        ("bin/", "dir", None),
        ("bin/su", "file", b"#!/bin/sh\n", {"mode": 0o4755}),
        ("bin/wall", "file", b"#!/bin/sh\n", {"mode": 0o2755}),
        ("bin/ping", "file", b"#!/bin/sh\n",
         {"pax": {"SCHILY.xattr.security.capability":
                  CAP_NET_RAW.decode("utf-8", "surrogateescape")}}),
        ("var/mail/", "dir", None, {"mode": 0o2775})]))
    s = ImageStore.open(str(tmp_path / "store"))
    convert(write_oci_layout(str(tmp_path / "layout"), [layer]), s, "v1")
    return s


def test_pull_writes_no_device_nodes_setid_bits_or_capabilities_by_default(
        privileged_image, tmp_path):
    report = PullReport()
    pull(privileged_image, "v1", str(tmp_path / "out"), report=report)
    out = tmp_path / "out"
    assert not os.path.lexists(out / "dev/null")
    assert stat.S_IMODE(os.lstat(out / "bin/su").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out / "bin/wall").st_mode) == 0o755
    assert "security.capability" not in os.listxattr(out / "bin/ping")
    assert stat.S_IMODE(os.lstat(out / "var/mail").st_mode) == 0o2775  # setgid dir: harmless
    assert report == PullReport(skipped_devices=1, cleared_setid=2, dropped_capabilities=1)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes and capabilities needs "
                    "root")
def test_pull_keeps_them_when_asked(privileged_image, tmp_path):
    out = tmp_path / "out"
    pull(privileged_image, "v1", str(out), policy=PullPolicy(devices=True, setid=True))
    st = os.lstat(out / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_IMODE(os.lstat(out / "bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(out / "bin/wall").st_mode) == 0o2755
    try:
        got = os.getxattr(out / "bin/ping", "security.capability")
    except OSError as exc:
        pytest.skip(f"this file system keeps no security.capability xattrs ({exc})")
    assert got == CAP_NET_RAW


def test_cli_pull_flags(privileged_image, tmp_path, capsys):
    import json
    rc = main(["image", "pull", "v1", str(tmp_path / "a"), "--store", privileged_image.uri])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["skipped_devices"] == 1 and out["cleared_setid"] == 2
    rc = main(["image", "pull", "v1", str(tmp_path / "b"), "--store", privileged_image.uri,
               "--keep-setid"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["cleared_setid"] == 0
    assert stat.S_IMODE(os.lstat(tmp_path / "b/bin/su").st_mode) == 0o4755
