"""A lazy image mount whose object store fails: readers get EIO, never wrong bytes, while the
store is down or corrupts data; the same files read correctly once it is back, in the same
mount; a mount process killed mid-read is restarted on its chunk cache, which holds only
whole, verified chunks. (tests/imageformat/test_mount.py covers a corrupt blob at rest and a
clean second mount sharing a cache; this adds the store failing under a live mount.)

The store is a real S3 server (localbucket) behind the fault proxy; the mount is the real
`warmstart image mount` in a child process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from warmstart.testing import faultproxy as fp
from warmstart.testing.faultproxy import FaultProxy

from settle_helpers import wait_until

pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed (the [image] extra)")
from warmstart.imageformat.backends import S3Config  # noqa: E402
from warmstart.imageformat.convert import convert, push  # noqa: E402
from warmstart.imageformat.mount import spawn_mount, unmount  # noqa: E402
from warmstart.imageformat.store import ImageStore  # noqa: E402

MiB = 1 << 20
FILES = {f"data/f{i}.bin": random.Random(i).randbytes(MiB + 12345 * i) for i in range(8)}
FILES["etc/small.txt"] = b"lazy mounts fail closed\n" * 40


def fuse_refused() -> str | None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "no /dev/fuse or fusermount3"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    return None


pytestmark = pytest.mark.skipif(fuse_refused() is not None, reason=str(fuse_refused()))


@pytest.fixture(scope="module")
def image(localbucket, tmp_path_factory):
    """The test tree converted locally and pushed to S3; returns the store URI."""
    base = tmp_path_factory.mktemp("mountfaults")
    for rel, data in FILES.items():
        (base / "root" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "root" / rel).write_bytes(data)
    localbucket.create_bucket("images")
    uri = f"s3://images/mount-faults-{os.getpid()}"
    s3 = S3Config(localbucket.endpoint, localbucket.access_key, localbucket.secret_key)
    with ImageStore.open(str(base / "local")) as src, ImageStore.open(uri, s3) as dst:
        convert(str(base / "root"), src, "v1", blob_size=2 * MiB)
        push(src, "v1", dst, "v1")
    return uri


@contextlib.contextmanager
def mounted(uri, endpoint, server, tmp_path, cache):
    mnt = tmp_path / f"mnt-{time.monotonic_ns()}"
    mnt.mkdir()
    env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL": endpoint}
    with open(tmp_path / "mount.log", "ab") as log:
        proc = spawn_mount(uri, "v1", str(mnt), str(cache), "--no-prefetch", env=env,
                           stderr=log)
        try:
            yield mnt, proc
        finally:
            unmount(str(mnt), proc)


def read(path: Path) -> bytes | int:
    """The file's bytes, or the errno its read failed with."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        return exc.errno


def cache_is_whole(cache: Path) -> int:
    """Every chunk file in the cache hashes to its name; returns how many there are."""
    names = [p for p in cache.rglob("*") if p.is_file() and len(p.name) == 64]
    for p in names:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, f"half-written {p}"
    return len(names)


def test_store_down_gives_eio_and_back_serves_without_remount(image, localbucket, tmp_path):
    with FaultProxy(localbucket.endpoint) as proxy, \
            mounted(image, proxy.endpoint, localbucket, tmp_path, tmp_path / "cache") \
            as (mnt, proc):
        assert read(mnt / "etc/small.txt") == FILES["etc/small.txt"]
        with proxy.injecting(fp.status(503, "SlowDown"), ranged=True):  # down: throttling
            assert read(mnt / "data/f0.bin") == errno.EIO
        with proxy.injecting(fp.reset_mid_body(0), ranged=True):  # down: resets
            assert read(mnt / "data/f1.bin") == errno.EIO
        assert read(mnt / "data/f0.bin") == FILES["data/f0.bin"]  # back, same mount
        assert read(mnt / "data/f1.bin") == FILES["data/f1.bin"]
        # a passing fault (two resets mid-body) is retried: the reader never sees it
        with proxy.injecting(fp.reset_mid_body(1000), ranged=True, max_count=2) as rule:
            assert read(mnt / "data/f7.bin") == FILES["data/f7.bin"]
        assert rule.faulted == 2
        assert proc.poll() is None
    log = (tmp_path / "mount.log").read_text()
    assert "EIO" in log


def test_store_unreachable_then_back_on_the_same_port(image, localbucket, tmp_path):
    proxy = FaultProxy(localbucket.endpoint).start()
    port = int(proxy.endpoint.rsplit(":", 1)[1])
    try:
        with mounted(image, proxy.endpoint, localbucket, tmp_path, tmp_path / "cache") \
                as (mnt, proc):
            proxy.stop()  # connection refused
            assert read(mnt / "data/f2.bin") == errno.EIO
            proxy = FaultProxy(localbucket.endpoint, port=port).start()
            assert read(mnt / "data/f2.bin") == FILES["data/f2.bin"]
            assert proc.poll() is None
    finally:
        proxy.stop()


def test_corrupted_bytes_from_the_store_are_eio_never_wrong(image, localbucket, tmp_path):
    with FaultProxy(localbucket.endpoint) as proxy, \
            mounted(image, proxy.endpoint, localbucket, tmp_path, tmp_path / "cache") \
            as (mnt, _):
        with proxy.injecting(fp.flip_bytes(1), ranged=True) as rule:
            assert read(mnt / "data/f3.bin") == errno.EIO
        assert rule.faulted > 0
        with proxy.injecting(fp.truncate(100), ranged=True):
            assert read(mnt / "data/f4.bin") == errno.EIO
        assert read(mnt / "data/f3.bin") == FILES["data/f3.bin"]
        assert read(mnt / "data/f4.bin") == FILES["data/f4.bin"]
    assert cache_is_whole(tmp_path / "cache") > 0


def test_killed_mount_restarts_on_its_chunk_cache(image, localbucket, tmp_path):
    cache = tmp_path / "cache"
    with FaultProxy(localbucket.endpoint) as proxy:
        with mounted(image, proxy.endpoint, localbucket, tmp_path, cache) as (mnt, proc):
            assert read(mnt / "data/f5.bin") == FILES["data/f5.bin"]
            assert read(mnt / "data/f6.bin") == FILES["data/f6.bin"]
            slow = proxy.add_rule(fp.bandwidth(256 << 10), ranged=True)  # f7 arrives slowly
            reader = threading.Thread(target=read, args=(mnt / "data/f7.bin",), daemon=True)
            reader.start()
            wait_until(lambda: slow.faulted > 0, "the mount fetches f7")
            proc.kill()  # SIGKILL mid-fetch: no chance to clean up
            proc.wait()
            reader.join(timeout=30)
        proxy.clear_rules()
        cached = cache_is_whole(cache)
        assert cached >= 2
        with mounted(image, proxy.endpoint, localbucket, tmp_path, cache) as (mnt, proc):
            # chunk data is now unavailable: what the first mount fetched comes from the cache
            with proxy.injecting(fp.status(503, "SlowDown"), ranged=True) as down:
                assert read(mnt / "data/f5.bin") == FILES["data/f5.bin"]
                assert read(mnt / "data/f6.bin") == FILES["data/f6.bin"]
                assert down.faulted == 0, "a cached chunk was fetched again"
                assert read(mnt / "etc/small.txt") == errno.EIO  # never fetched before
            assert read(mnt / "data/f7.bin") == FILES["data/f7.bin"]
    assert cache_is_whole(cache) > cached


@pytest.mark.parametrize("fault, ok", [(fp.status(503, "SlowDown"), True),
                                       (fp.reset_mid_body(1000), True),
                                       (fp.flip_bytes(1), False)])
def test_full_pull_under_faults(image, localbucket, tmp_path, fault, ok):
    """The non-lazy path: `pull` retries transient faults to an identical tree, and refuses
    corrupted chunks with DigestMismatch, leaving nothing at the destination."""
    from warmstart.errors import DigestMismatch
    from warmstart.imageformat.pull import pull

    with FaultProxy(localbucket.endpoint) as proxy:
        # pull coalesces its reads into a few large ranged GETs: transient faults hit the
        # first two (then retries succeed), a flip hits every one
        rule = proxy.add_rule(fault, ranged=True, max_count=2 if ok else None)
        s3 = S3Config(proxy.endpoint, localbucket.access_key, localbucket.secret_key)
        dest = tmp_path / "tree"
        with ImageStore.open(image, s3) as store:
            if ok:
                pull(store, "v1", str(dest))
                assert {rel: (dest / rel).read_bytes() for rel in FILES} == FILES
            else:
                with pytest.raises(DigestMismatch):
                    pull(store, "v1", str(dest))
                assert not dest.exists()
        assert rule.faulted > 0
