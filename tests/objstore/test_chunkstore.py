"""The node's one chunk store: single flight, verified on write and on first use, the size
bound (LRU, across restarts), atomic writes, stale temp files of killed writers removed, and
the names the Ray gateway keeps pieces under. (Several processes sharing one store, one killed
part-way, is tests/reliability/test_soak.py::test_processes_share_one_chunk_cache.)"""

from __future__ import annotations

import os
import threading
import time

import pytest

from warmstart.errors import ConfigError, DigestMismatch
from warmstart.storage.chunkstore import STALE_TMP_SECONDS, TMP_PREFIX, ChunkStore, sha256

from settle_helpers import wait_until


def files(root) -> list:
    return [p for p in root.rglob("*") if p.is_file() and p.name != ".evict.lock"]


def wait_for_waiters(store: ChunkStore, n: int) -> None:
    """Blocks a fetch until `n` other readers have joined its flight, however slowly the
    machine starts their threads."""
    wait_until(lambda: store.stats.waits >= n, f"{n} readers joined the fetch")


def test_single_flight_fetches_once_for_many_readers(tmp_path):
    store = ChunkStore(str(tmp_path))
    data = os.urandom(100_000)
    d = sha256(data)
    calls = []

    def slow_fetch():
        calls.append(d)
        wait_for_waiters(store, 7)  # the fetch is in flight until every other reader waits
        return data

    results = []
    threads = [threading.Thread(
        target=lambda: results.append(store.get_or_fetch(d, slow_fetch, len(data))))
        for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert calls == [d] and results == [data] * 8
    assert store.stats.waits == 7 and store.stats.fetched_bytes == len(data)
    assert store.digests() == {d}


def test_failed_fetch_reaches_every_waiter_and_is_not_stored(tmp_path):
    store = ChunkStore(str(tmp_path))
    d = sha256(b"abc")
    calls = []

    def boom():
        calls.append(d)
        wait_for_waiters(store, 3)
        raise ConnectionError("store down")

    errors = []

    def reader():
        try:
            store.get_or_fetch(d, boom)
        except ConnectionError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(errors) == 4 and calls == [d]  # one fetch, its error seen by all four
    assert store.digests() == set()
    assert store.get_or_fetch(d, lambda: b"abc") == b"abc"  # the next try fetches again


def test_wrong_bytes_are_never_stored(tmp_path):
    store = ChunkStore(str(tmp_path))
    with pytest.raises(DigestMismatch, match="do not match"):
        store.get_or_fetch(sha256(b"good"), lambda: b"evil")
    with pytest.raises(DigestMismatch, match=sha256(b"good")):
        store.put(b"evil", sha256(b"good"))
    with pytest.raises(DigestMismatch, match="do not match"):  # right bytes, wrong size
        store.get_or_fetch(sha256(b"good"), lambda: b"good", size=5)
    assert files(tmp_path) == []


def test_eviction_keeps_disk_under_the_bound_least_recently_used_first(tmp_path):
    store = ChunkStore(str(tmp_path), max_bytes=10_000)
    digests = []
    for i in range(3):
        digests.append(store.put(bytes([i]) * 3000))
        os.utime(store.data_path(digests[-1]), (i, i))  # distinct ages, oldest first
    store.get(digests[0])  # used again: now the newest
    digests.append(store.put(bytes([3]) * 3000))  # 12000 > 10000: evict down to 9000
    assert store.usage() <= 9000 and store.stats.evicted == 1
    assert store.get(digests[1]) is None  # the least recently used went first
    assert all(store.get(d) is not None for d in (digests[0], digests[2], digests[3]))
    again = ChunkStore(str(tmp_path), max_bytes=5000)  # a restart enforces a new bound
    assert again.usage() <= 5000
    assert sum(p.stat().st_size for p in files(tmp_path)) <= 5000


def test_eviction_through_get_or_fetch(tmp_path):
    store = ChunkStore(str(tmp_path), max_bytes=350_000)
    for _ in range(6):
        data = os.urandom(100_000)
        assert store.get_or_fetch(sha256(data), lambda data=data: data) == data
    assert sum(p.stat().st_size for p in files(tmp_path)) <= 350_000
    assert store.stats.evicted == 3 and store.stats.misses == 6


def test_a_file_is_verified_on_first_use_and_healed(tmp_path):
    data = os.urandom(5000)
    d = ChunkStore(str(tmp_path)).put(data)
    path = ChunkStore(str(tmp_path)).data_path(d)
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    fresh = ChunkStore(str(tmp_path))  # first use by this store: hashed, found bad, deleted
    calls = []
    assert fresh.get_or_fetch(d, lambda: calls.append(1) or data) == data
    assert calls == [1] and fresh.stats.corrupt == 1
    assert open(path, "rb").read() == data  # the fetched bytes replaced the bad file


def test_verify_policies(tmp_path):
    store = ChunkStore(str(tmp_path))
    d = store.put(b"hello")
    with open(store.data_path(d), "r+b") as f:
        f.write(b"j")
    # this store wrote the file, so under "first-use" it trusts it from then on
    assert store.get(d) == b"jello"
    assert store.get(d, verify=False) == b"jello"
    assert store.get(d, verify=True) is None and not os.path.exists(store.data_path(d))
    always = ChunkStore(str(tmp_path / "always"), verify="always")
    d = always.put(b"hello")
    with open(always.data_path(d), "r+b") as f:
        f.write(b"j")
    assert always.get(d) is None
    with pytest.raises(ConfigError, match="verify"):
        ChunkStore(str(tmp_path), verify="sometimes")
    with pytest.raises(ConfigError, match="max_bytes"):
        ChunkStore(str(tmp_path), max_bytes=0)


def test_a_put_that_finds_the_file_there_does_not_vouch_for_it(tmp_path):
    d = ChunkStore(str(tmp_path)).put(b"hello")
    with open(ChunkStore(str(tmp_path)).data_path(d), "r+b") as f:
        f.write(b"j")  # damaged on disk after another process wrote it
    other = ChunkStore(str(tmp_path))
    assert other.put(b"hello") == d  # already there: not written again, and not trusted
    assert other.get(d) is None and other.stats.corrupt == 1
    assert other.get_or_fetch(d, lambda: b"hello") == b"hello"


def test_named_pieces_for_the_gateway(tmp_path):
    store = ChunkStore(str(tmp_path), 1 << 30, verify="always")
    digest = store.put_named("k1", b"hello")
    assert store.lookup("k1") == digest == sha256(b"hello")
    assert store.get_named("k1") == (digest, b"hello")
    assert store.get_named("nothing") is None
    with open(store.data_path(digest), "r+b") as f:
        f.write(b"j")
    assert store.get_named("k1", verify=False) == (digest, b"jello")
    assert store.get_named("k1") is None  # verified read: detected and deleted


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    """A writer killed between write and rename leaves a temp file; the next store to open the
    folder removes those old enough to have no live writer, keeps fresh ones, and never counts
    or serves either."""
    sub = tmp_path / "data" / "ab"
    sub.mkdir(parents=True)
    old, fresh = sub / f"{TMP_PREFIX}old", sub / f"{TMP_PREFIX}fresh"
    old.write_bytes(b"half a chunk")
    fresh.write_bytes(b"being written")
    past = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old, (past, past))
    store = ChunkStore(str(tmp_path))
    assert not old.exists() and fresh.exists()
    assert store.usage() == 0 and store.digests() == set()


def test_a_disk_that_cannot_keep_a_chunk_costs_the_copy_not_the_read(tmp_path):
    store = ChunkStore(str(tmp_path))
    d = sha256(b"y")
    (tmp_path / "data" / d[:2]).write_bytes(b"")  # its folder cannot be made
    with pytest.raises(OSError):
        store.put(b"y")
    assert store.get_or_fetch(d, lambda: b"y") == b"y"
    assert store.digests() == set() and not any(
        p.name.startswith(TMP_PREFIX) for p in tmp_path.rglob("*"))


def test_chunks_in_the_old_mount_cache_layout_are_deleted(tmp_path):
    """The image mount's cache used to keep `ROOT/ab/<sha256>`: nothing reads those now, so a
    store opening the folder deletes them (and only them) rather than leave them unbounded."""
    d = sha256(b"old chunk")
    old = tmp_path / d[:2]
    old.mkdir()
    (old / d).write_bytes(b"old chunk")
    keep = tmp_path / "ab"
    keep.mkdir()
    (keep / "notes.txt").write_text("not a chunk")
    store = ChunkStore(str(tmp_path))
    assert not old.exists() and (keep / "notes.txt").exists()
    assert store.get(d) is None and store.usage() == 0
