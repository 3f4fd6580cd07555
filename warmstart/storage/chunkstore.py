"""The one content-addressed chunk store of a node: image mounts, the containerd snapshotter,
the podman layer store and the Ray node gateway keep their chunks here, one copy each.

Layout under `root`:
  data/ab/<sha256>    chunk bytes, named by the SHA-256 of their content
  names/cd/<key>      the digest (hex) a stable key names (an object, version and piece index)
  .evict.lock         taken (flock) by whichever process is evicting
(The image mount's cache before this store kept chunks as `root/ab/<sha256>`; a store that opens
such a folder deletes those files, which nothing reads any more, instead of leaving them to
fill the disk outside the bound.)

Guarantees:
- Atomic writes: a chunk is written to `.tmp-<pid>-<thread>-<ns>` in its own folder and renamed
  into place, so readers (in any process) see a whole file or none; concurrent writers of the
  same chunk race harmlessly, the content is identical. A temporary file older than
  `STALE_TMP_SECONDS` has no live writer (it was left by a killed one) and is removed when a
  store opens the folder or evicts.
- Verified: bytes are hashed before they are written (`put`, unless the caller says it has just
  hashed them itself; `get_or_fetch` always hashes what `fetch` returns). Reading from disk,
  the store's `verify` policy decides: "first-use" (default) hashes a file the first time this
  store object reads it, unless it wrote the file itself, and trusts it afterwards; "always"
  hashes every disk read. A file that does not hash to its name is deleted and reported missing,
  so a damaged store heals itself.
- Size-bounded: beyond `max_bytes`, the least recently used chunks (mtime, touched on every
  disk hit) are deleted down to `LOW_WATER` of the bound, one process at a time. Each process
  counts its own writes from its last scan, so the bound is checked with what this process
  knows: other processes' writes since that scan are seen at its next scan. A reader that
  opened a file before it was deleted still reads it whole.
- Single flight: concurrent `get_or_fetch` calls for one chunk in one process run one fetch;
  a failed fetch reaches every waiter and nothing is stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from warmstart.errors import ConfigError, DigestMismatch

log = logging.getLogger("warmstart.storage")
LOW_WATER = 0.9
STALE_TMP_SECONDS = 3600  # a temporary chunk file this old has no live writer
TMP_PREFIX = ".tmp-"
VERIFY_POLICIES = ("first-use", "always")


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ChunkStoreStats:
    hits: int = 0  # served from memory or disk
    misses: int = 0  # fetched, because neither had it
    fetched_bytes: int = 0
    evicted: int = 0  # files this process deleted to keep the bound
    waits: int = 0  # requests that joined a fetch already in flight
    corrupt: int = 0  # files that did not hash to their name (deleted)


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkStore:
    def __init__(self, root: str, max_bytes: int = 8 << 30, *, memory_bytes: int = 0,
                 verify: str = "first-use") -> None:
        if max_bytes <= 0:
            raise ConfigError(f"chunk store {root}: max_bytes must be positive, got {max_bytes}")
        if verify not in VERIFY_POLICIES:
            raise ConfigError(f"chunk store {root}: verify must be one of "
                              f"{', '.join(VERIFY_POLICIES)}, got {verify!r}")
        self.root, self.max_bytes, self.memory_bytes = root, max_bytes, memory_bytes
        self.verify_policy = verify
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        os.makedirs(os.path.join(root, "names"), exist_ok=True)
        self.stats = ChunkStoreStats()
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._verified: set[str] = set()
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_used = 0
        self._usage = 0
        self._drop_old_layout()
        self.evict()  # counts what is there, removes stale temp files, enforces the bound

    # --- paths ----------------------------------------------------------------------------
    def data_path(self, digest: str) -> str:
        return os.path.join(self.root, "data", digest[:2], digest)

    def name_path(self, key: str) -> str:
        return os.path.join(self.root, "names", key[:2], key)

    def digests(self) -> set[str]:
        """The digests of every whole chunk on disk now."""
        return {os.path.basename(path) for path, _, _ in self._scan()}

    # --- chunks by digest -----------------------------------------------------------------
    def get(self, digest: str, *, verify: bool | None = None) -> bytes | None:
        """The bytes named `digest` from disk, or None. `verify`: None follows the store's
        policy, True always hashes, False never does."""
        path = self.data_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:  # an unreadable file is a miss: the chunk is fetched again
            log.warning("chunk store: cannot read %s: %s", path, exc)
            return None
        if verify is None:
            verify = self.verify_policy == "always" or digest not in self._verified
        if verify:
            if sha256(data) != digest:
                log.warning("chunk store: %s does not match its name; deleting it", path)
                with self._lock:
                    self.stats.corrupt += 1
                self._unlink(path, len(data))
                return None
            with self._lock:
                self._verified.add(digest)
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return data

    def put(self, data, digest: str | None = None, *, verified: bool = False) -> str:
        """Stores `data`; returns its digest. A given `digest` must match (`verified`: the
        caller has just hashed `data` itself, so it is not hashed again)."""
        actual = digest if (verified and digest) else sha256(data)
        if digest is not None and digest != actual:
            raise DigestMismatch(f"chunk store {self.root}: bytes hash to {actual}, "
                                 f"not {digest}")
        path = self.data_path(actual)
        if os.path.exists(path):  # another writer's file: verified when this store reads it
            with contextlib.suppress(OSError):
                os.utime(path)
            return actual
        _write_atomic(path, data)
        with self._lock:
            self._verified.add(actual)
            self._usage += len(data)
            over = self._usage > self.max_bytes
        if over:
            self.evict()
        return actual

    def get_or_fetch(self, digest: str, fetch: Callable[[], bytes],
                     size: int | None = None) -> bytes:
        """The chunk's verified bytes, from memory, disk or (once, however many threads ask)
        from `fetch`. Bytes from `fetch` that do not match `digest` (and `size`) raise
        DigestMismatch and are never stored. A disk that cannot take the chunk costs a
        warning, not the read."""
        with self._lock:
            data = self._memory.get(digest)
            if data is not None:
                self._memory.move_to_end(digest)
                self.stats.hits += 1
                return data
            flight = self._flights.get(digest)
            leader = flight is None
            if leader:
                flight = self._flights[digest] = _Flight()
            else:
                self.stats.waits += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data
        try:
            data = self.get(digest)
            if data is not None and size is not None and len(data) != size:
                self._unlink(self.data_path(digest), len(data))
                data = None
            if data is None:
                data = fetch()
                if (size is not None and len(data) != size) or sha256(data) != digest:
                    raise DigestMismatch(f"chunk {digest}: fetched bytes do not match its "
                                         "digest")
                try:
                    self.put(data, digest, verified=True)
                except OSError as exc:
                    log.warning("chunk store: cannot keep chunk %s in %s: %s", digest,
                                self.root, exc)
                with self._lock:
                    self.stats.misses += 1
                    self.stats.fetched_bytes += len(data)
            else:
                with self._lock:
                    self.stats.hits += 1
            self._remember(digest, data)
            flight.data = data
            return data
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._flights.pop(digest, None)
            flight.done.set()

    # --- names -> digests -----------------------------------------------------------------
    def lookup(self, key: str) -> str | None:
        try:
            with open(self.name_path(key)) as f:
                digest = f.read().strip()
        except FileNotFoundError:
            return None
        return digest if len(digest) == 64 else None

    def remember(self, key: str, digest: str) -> None:
        _write_atomic(self.name_path(key), digest.encode())

    def get_named(self, key: str, *, verify: bool | None = None) -> tuple[str, bytes] | None:
        digest = self.lookup(key)
        if digest is None:
            return None
        data = self.get(digest, verify=verify)
        return None if data is None else (digest, data)

    def put_named(self, key: str, data, digest: str | None = None, *,
                  verified: bool = False) -> str:
        digest = self.put(data, digest, verified=verified)
        self.remember(key, digest)
        return digest

    # --- size bound -----------------------------------------------------------------------
    def usage(self) -> int:
        """Bytes of whole chunks on disk now (a scan)."""
        return sum(size for _, size, _ in self._scan())

    def evict(self) -> int:
        """Rescans the store (removing stale temp files) and, when over the bound, deletes
        least recently used chunks down to `LOW_WATER` of it. One process at a time (flock);
        returns the bytes freed."""
        freed = 0
        with open(os.path.join(self.root, ".evict.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                files = sorted(self._scan(clean=True), key=lambda f: (f[2], f[0]))
                usage = sum(size for _, size, _ in files)
                if usage > self.max_bytes:
                    target = int(self.max_bytes * LOW_WATER)
                    for path, size, _ in files:
                        if usage <= target:
                            break
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                            usage -= size
                            freed += size
                            self.stats.evicted += 1
                with self._lock:
                    self._usage = usage
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return freed

    def _drop_old_layout(self) -> None:
        freed = 0
        for sub in os.scandir(self.root):
            if not (sub.is_dir(follow_symlinks=False) and _is_hex(sub.name, 2)):
                continue
            for entry in os.scandir(sub.path):
                if _is_hex(entry.name, 64) or entry.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        freed += entry.stat(follow_symlinks=False).st_size
                        os.unlink(entry.path)
            with contextlib.suppress(OSError):
                os.rmdir(sub.path)
        if freed:
            log.info("chunk store %s: deleted %d bytes of chunks in the old layout", self.root,
                     freed)

    def _scan(self, clean: bool = False) -> Iterator[tuple[str, int, float]]:
        stale = time.time() - STALE_TMP_SECONDS
        for sub in os.scandir(os.path.join(self.root, "data")):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    if entry.name.startswith(TMP_PREFIX):
                        if clean and st.st_mtime < stale:
                            os.unlink(entry.path)  # left by a writer killed before its rename
                        continue
                    yield entry.path, st.st_size, st.st_mtime

    def _unlink(self, path: str, size: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            with self._lock:
                self._usage -= size

    def _remember(self, digest: str, data: bytes) -> None:
        with self._lock:
            if digest in self._memory or len(data) > self.memory_bytes:
                return
            self._memory[digest] = data
            self._memory_used += len(data)
            while self._memory_used > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self._memory_used -= len(old)


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and all(c in "0123456789abcdef" for c in name)


def _write_atomic(path: str, data) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-"
                               f"{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
