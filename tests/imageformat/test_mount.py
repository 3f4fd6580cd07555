"""Real FUSE mounts: bytes and metadata equal the source tree, nosuid/nodev/ro, EIO on a bad
chunk while the rest keeps working, a program started from the mount, record/replay."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from imageformat_helpers import BLOB, snapshot

from warmstart.imageformat._aio import run_sync
from warmstart.imageformat.convert import convert, push
from warmstart.imageformat.store import ImageStore, blob_key

pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (pip install -e '.[image]', "
                                      "which needs Debian's libfuse3-dev)")
from warmstart.imageformat.mount import spawn_mount, unmount  # noqa: E402


def fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package 'fuse3')"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    return None


pytestmark = pytest.mark.skipif(fuse_usable() is not None, reason=str(fuse_usable()))


@pytest.fixture(scope="module", autouse=True)
def fuse_mounts_here(tmp_path_factory):
    """Mounts a one-file image once; if this machine refuses FUSE mounts (a container without
    CAP_SYS_ADMIN), every test here is skipped with the reason instead of failing."""
    base = tmp_path_factory.mktemp("probe")
    (base / "root").mkdir()
    (base / "root/hello").write_text("hi")
    with ImageStore.open(str(base / "store")) as s:
        convert(str(base / "root"), s, "probe")
    (base / "mnt").mkdir()
    with open(base / "log", "wb") as log:
        try:
            proc = spawn_mount(str(base / "store"), "probe", str(base / "mnt"),
                               str(base / "cache"), stderr=log)
        except Exception as exc:  # noqa: BLE001 - the reason goes into the skip
            pytest.skip(f"FUSE mounts are refused here: {exc}: "
                        f"{(base / 'log').read_text()[-300:]}")
    unmount(str(base / "mnt"), proc)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")


def cached_digests(cache) -> set[str]:
    """The chunks in a mount's chunk store (`data/ab/<sha256>`), temp files left out."""
    data = os.path.join(cache, "data")
    if not os.path.isdir(data):
        return set()
    return {n for d in os.listdir(data) for n in os.listdir(os.path.join(data, d))
            if not n.startswith(".")}


@contextlib.contextmanager
def mounted(store: str, ref: str, tmp_path, *args: str, cache: str | None = None,
            env: dict | None = None):
    mnt = tmp_path / f"mnt-{time.monotonic_ns()}"
    mnt.mkdir()
    log = open(tmp_path / "mount.log", "ab")
    proc = spawn_mount(store, ref, str(mnt), cache or str(tmp_path / "cache"), *args,
                       env=env, stderr=log)
    try:
        yield str(mnt), proc
    finally:
        unmount(str(mnt), proc)
        log.close()


@pytest.fixture(scope="module")
def image_store(py_rootfs, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("mountstore") / "store")
    with ImageStore.open(path) as s:
        convert(py_rootfs, s, "v1", blob_size=BLOB)
    return path


def test_mount_serves_every_file_and_its_metadata(image_store, py_rootfs, tmp_path):
    with mounted(image_store, "v1", tmp_path) as (mnt, proc):
        assert snapshot(mnt) == snapshot(py_rootfs)
        flags = os.statvfs(mnt).f_flag
        assert flags & os.ST_RDONLY and flags & os.ST_NOSUID and flags & os.ST_NODEV
        assert os.stat(f"{mnt}/data/suid").st_mode & 0o4000  # kept as metadata
        with pytest.raises(OSError) as err:
            open(f"{mnt}/etc/os-release", "w")
        assert err.value.errno == errno.EROFS
        a, b = os.stat(f"{mnt}/data/random.bin"), os.stat(f"{mnt}/data/random-link.bin")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert proc.returncode == 0 and not os.path.ismount(mnt)


def test_only_what_is_read_is_fetched_and_cached_once(image_store, tmp_path):
    cache = str(tmp_path / "shared-cache")
    with mounted(image_store, "v1", tmp_path, cache=cache) as (mnt, _):
        with open(f"{mnt}/etc/os-release", "rb") as f:
            assert b"warmstart test image" in f.read()
    assert len(cached_digests(cache)) == 1  # one chunk fetched for one small file
    with mounted(image_store, "v1", tmp_path, cache=cache) as (mnt, _):
        # a second mount shares the cache: no new fetch for the same file
        with open(f"{mnt}/etc/os-release", "rb") as f:
            f.read()
    assert len(cached_digests(cache)) == 1


def test_bad_chunk_gives_eio_and_the_mount_keeps_serving(py_rootfs, tmp_path):
    store = str(tmp_path / "store")
    with ImageStore.open(store) as s:
        convert(py_rootfs, s, "v1", blob_size=BLOB)
        image = s.open_image("v1")
        victim = next(e for e in image.toc.entries if e.path == "data/zeros.bin")
        loc = image.index.locations[victim.chunks[0].digest]

        async def corrupt():
            key = blob_key(loc.blob)
            data = bytearray(await s.backend.get(key))
            data[loc.offset + loc.csize // 2] ^= 0xFF
            await s.backend.put(key, bytes(data))
    with mounted(store, "v1", tmp_path) as (mnt, _):
        with open(f"{mnt}/etc/os-release", "rb") as f:
            before = f.read()
        with ImageStore.open(store) as s:
            run_sync(corrupt())
        with pytest.raises(OSError) as err:
            with open(f"{mnt}/data/zeros.bin", "rb") as f:
                f.read()
        assert err.value.errno == errno.EIO
        with open(f"{mnt}/etc/os-release", "rb") as f:
            assert f.read() == before
        with open(f"{mnt}/data/random.bin", "rb") as f, \
                open(f"{py_rootfs}/data/random.bin", "rb") as g:
            assert f.read() == g.read()
    log = (tmp_path / "mount.log").read_text()
    assert victim.chunks[0].digest in log and "EIO" in log


@needs_root
def test_python_starts_from_a_lazy_mount(image_store, tmp_path):
    with mounted(image_store, "v1", tmp_path) as (mnt, _):
        r = subprocess.run(["chroot", mnt, "/usr/bin/python3", "-c",
                            "import json, sys; print(json.dumps({'py': sys.version_info[:2]}))"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"py": [3, 11]}


def mount_counters(tmp_path) -> dict:
    """The counters a mount logs when it ends (`mount ended: {...}`, at INFO)."""
    ends = [ln.split("mount ended: ", 1)[1] for ln in
            (tmp_path / "mount.log").read_text().splitlines() if "mount ended: " in ln]
    assert ends, (tmp_path / "mount.log").read_text()[-2000:]
    return json.loads(ends[-1])


def test_a_second_reader_is_served_from_the_kernel_cache(image_store, py_rootfs, tmp_path):
    """keep_cache: a file read by one process and then by another reaches the mount once;
    the first read fetched and verified each chunk once (misses), the second costs nothing."""
    path = "data/random.bin"
    size = os.path.getsize(f"{py_rootfs}/{path}")
    with open(f"{py_rootfs}/{path}", "rb") as f:
        want = f.read()
    env = dict(os.environ, WARMSTART_LOG="INFO")
    with mounted(image_store, "v1", tmp_path, env=env) as (mnt, _):
        for _ in range(2):  # two processes, one after the other
            r = subprocess.run(["cat", f"{mnt}/{path}"], capture_output=True, check=True)
            assert r.stdout == want
    stats = mount_counters(tmp_path)
    assert stats["bytes_read"] == size  # once, not twice
    assert stats["misses"] >= 1 and stats["fetched_bytes"] >= size  # fetched and verified
    assert stats["read_calls"] >= 1


@needs_root
def test_record_then_prefetch_in_recorded_order(py_rootfs, tmp_path):
    store = str(tmp_path / "store")
    with ImageStore.open(store) as s:
        convert(py_rootfs, s, "v1", blob_size=BLOB)
    cmd = ["/usr/bin/python3", "-c", "import json; print('ok')"]
    r = subprocess.run([sys.executable, "-m", "warmstart.imageformat.cli", "record", "v1",
                        "--store", store, "--", *cmd], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    with ImageStore.open(store) as s:
        image = s.open_image("v1")
        assert image.profile is not None and image.profile.toc == image.toc_digest
        profile = list(image.profile.chunks)
        total = len(image.toc.unique_chunks())
        assert 5 < len(profile) < total  # the start-up reads some, not all, of the image
        other = ImageStore.open(str(tmp_path / "other"))
        push(s, "v1", other, "v1")
        assert other.open_image("v1").profile == image.profile  # travels with the image
    cache = tmp_path / "cache"
    with mounted(store, "v1", tmp_path, cache=str(cache)) as (mnt, _):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            have = cached_digests(cache)
            if have >= set(profile):
                break
            time.sleep(0.05)
        assert have == set(profile)  # prefetched before anyone read, and nothing else
        r = subprocess.run(["chroot", mnt, *cmd], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "ok"
    # the replayed start-up needed nothing beyond the profile
    assert cached_digests(cache) == set(profile)


def test_mount_from_s3_fetches_little_more_than_it_reads(py_rootfs, s3_servers, tmp_path):
    from warmstart.imageformat.backends import S3Config
    srv = s3_servers["localbucket"]
    uri = f"s3://images/mount-{os.getpid()}"
    with ImageStore.open(str(tmp_path / "local")) as src, \
            ImageStore.open(uri, S3Config(srv.endpoint, srv.access_key, srv.secret_key)) as dst:
        convert(py_rootfs, src, "v1", blob_size=BLOB)
        push(src, "v1", dst, "v1")
    env = {**os.environ, **srv.env()}
    cache = tmp_path / "cache"
    with mounted(uri, "v1", tmp_path, cache=str(cache), env=env) as (mnt, _):
        with open(f"{mnt}/data/random.bin", "rb") as f:
            f.seek(1 << 20)
            part = f.read(100_000)
    with open(f"{py_rootfs}/data/random.bin", "rb") as f:
        f.seek(1 << 20)
        assert part == f.read(100_000)
    fetched = sum(p.stat().st_size for p in (cache / "data").rglob("*") if p.is_file())
    # a 100 kB read costs at most a couple of chunks (max 1 MiB), never the 3 MiB file
    assert 100_000 <= fetched <= 2 << 20


@needs_root
def test_device_nodes_are_metadata_only_under_nodev(tmp_path):
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o6755)
    store = str(tmp_path / "store")
    with ImageStore.open(store) as s:
        convert(str(root), s, "dev")
        entry = next(e for e in s.open_image("dev").toc.entries if e.path == "dev/null")
        assert (entry.type, entry.devmajor, entry.devminor) == ("char", 1, 3)
    with mounted(store, "dev", tmp_path) as (mnt, _):
        st = os.stat(f"{mnt}/dev/null")
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        assert os.stat(f"{mnt}/suid").st_mode & 0o6000 == 0o6000
        with pytest.raises(PermissionError):
            open(f"{mnt}/dev/null", "rb")  # nodev: the node cannot be used


def test_tampered_toc_is_never_mounted(py_rootfs, tmp_path):
    from warmstart.errors import SourceError
    store = str(tmp_path / "store")
    with ImageStore.open(store) as s:
        convert(py_rootfs, s, "v1", blob_size=BLOB)
        toc = s.open_image("v1").toc_digest

        async def corrupt():
            key = blob_key(toc)
            data = (await s.backend.get(key)).replace(b'"mode":493', b'"mode":511', 1)
            await s.backend.put(key, data)
        run_sync(corrupt())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(tmp_path / "err.log", "wb") as log:
        with pytest.raises(SourceError, match="before mounting"):
            spawn_mount(store, "v1", str(mnt), str(tmp_path / "cache"), stderr=log)
    assert not os.path.ismount(mnt)
    err = (tmp_path / "err.log").read_text()
    assert "TOC" in err and toc in err
