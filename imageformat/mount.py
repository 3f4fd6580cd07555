"""Serve an image as a lazy, read-only FUSE mount; prefetch its start-up profile.

`serve` runs in the foreground until the mount is unmounted or the process gets SIGINT or
SIGTERM. The mount is `ro,nosuid,nodev`. If the image carries a start-up profile, its
chunks are fetched into the cache in recorded order by a few background threads, ahead of
readers (a reader that needs the same chunk joins the fetch in flight). With `record_path`,
the chunks read are written there as a profile when the mount ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyfuse3
import trio

from warmstart.errors import SourceError
from warmstart.storage.chunkstore import ChunkStore

from ._aio import run_sync
from .fusefs import ImageFS
from .manifest import encode_profile
from .model import Chunk, Profile
from .store import Image, ImageStore

log = logging.getLogger("warmstart.imageformat")

MOUNT_OPTIONS = ("fsname=warmstart", "subtype=warmstart", "ro", "nosuid", "nodev",
                 "default_permissions")

MEMORY_BYTES = 64 << 20  # hot chunks kept in memory by one mount


@dataclass(frozen=True)
class MountOptions:
    cache_dir: str
    cache_bytes: int = 8 << 30
    prefetch: bool = True
    prefetch_threads: int = 8
    record_path: str | None = None
    read_ahead_kb: int = 1024
    threads: int = 16
    fetch_timeout: float = 120.0
    map_user: str | None = None  # show owners as rootless podman maps them for this user


def _fetcher(store: ImageStore, image: Image, timeout: float):
    def fetch(chunk: Chunk) -> bytes:
        return run_sync(store.fetch_chunk(image, chunk), timeout=timeout)
    return fetch


def _set_read_ahead(mountpoint: str, kb: int) -> None:
    """Raises the mount's read-ahead (kernel default 128 KiB) via its backing device info."""
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4] == target:
                    with open(f"/sys/class/bdi/{parts[2]}/read_ahead_kb", "w") as ra:
                        ra.write(str(kb))
    except OSError as exc:
        log.info("could not raise read_ahead_kb on %s: %s", mountpoint, exc)


def _prefetch(fs: ImageFS, profile: Profile, chunks: dict[str, Chunk], threads: int,
              stop: threading.Event) -> None:
    def one(chunk: Chunk) -> None:
        if stop.is_set():
            return
        try:
            fs.chunk(chunk)
        except Exception as exc:  # noqa: BLE001 - a reader will see EIO if it matters
            log.warning("prefetch of chunk %s failed: %s", chunk.digest, exc)
    todo = [chunks[d] for d in profile.chunks if d in chunks]
    with ThreadPoolExecutor(threads, thread_name_prefix="warmstart-prefetch") as pool:
        list(pool.map(one, todo))
    log.info("prefetched %d profile chunks", len(todo))


def serve(store: ImageStore, ref: str, mountpoint: str, opts: MountOptions) -> dict:
    image = store.open_image(ref)
    cache = ChunkStore(opts.cache_dir, opts.cache_bytes, memory_bytes=MEMORY_BYTES)
    owner = None
    if opts.map_user:
        from .idmap import rootless_map
        owner = rootless_map(opts.map_user).owner
    fs = ImageFS(image.toc.entries, cache, _fetcher(store, image, opts.fetch_timeout),
                 record=opts.record_path is not None, threads=opts.threads, owner=owner)
    options = set(MOUNT_OPTIONS)
    if os.geteuid() == 0:
        options.add("allow_other")  # containers run as other users; non-root needs fuse.conf
    pyfuse3.init(fs, mountpoint, options)
    stop = threading.Event()
    if opts.prefetch and image.profile is not None and opts.record_path is None:
        chunks = {c.digest: c for c in image.toc.unique_chunks()}
        threading.Thread(target=_prefetch, name="warmstart-prefetch", daemon=True,
                         args=(fs, image.profile, chunks, opts.prefetch_threads, stop)).start()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(watch_signals)
            nursery.start_soon(trio.to_thread.run_sync, _set_read_ahead, mountpoint,
                               opts.read_ahead_kb)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    log.info("serving %s (%s) at %s", ref, image.digest, mountpoint)
    try:
        trio.run(main)
    finally:
        stop.set()
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:  # noqa: BLE001 - already unmounted from outside
            log.info("close: %s", exc)
    if opts.record_path is not None:
        profile = Profile(image.toc_digest, tuple(fs.recorded or ()))
        with open(opts.record_path, "wb") as f:
            f.write(encode_profile(profile))
    stats = {"read_calls": fs.read_calls, "bytes_read": fs.bytes_read,
             "fetched_bytes": cache.stats.fetched_bytes,
             "hits": cache.stats.hits, "misses": cache.stats.misses,
             "waits": cache.stats.waits, "evicted": cache.stats.evicted}
    log.info("mount ended: %s", json.dumps(stats))
    return stats


# --- a mount in a child process (record, tests, benchmarks) ----------------------------

def spawn_mount(store_uri: str, ref: str, mountpoint: str, cache_dir: str, *args: str,
                env: dict | None = None, timeout: float = 30.0,
                stderr=None) -> subprocess.Popen:
    """Starts `warmstart image mount` in a child process and waits until it is mounted."""
    cmd = [sys.executable, "-m", "warmstart.imageformat.cli", "mount", ref, mountpoint,
           "--store", store_uri, "--cache", cache_dir, *args]
    proc = subprocess.Popen(cmd, env=env, stderr=stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return proc
        if proc.poll() is not None:
            raise SourceError(f"mount of {ref} exited with {proc.returncode} before mounting")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise SourceError(f"mount of {ref} at {mountpoint} did not appear within {timeout:.0f}s")


def unmount(mountpoint: str, proc: subprocess.Popen | None, timeout: float = 30.0) -> int:
    """Unmounts (lazily if busy) and waits for the serving process; returns its exit code."""
    if os.path.ismount(mountpoint):
        r = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    if proc is None:
        return 0
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
