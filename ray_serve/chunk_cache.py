"""A node-local, content-addressed, size-bounded store of byte pieces.

Layout under `root`:
  data/ab/<sha256>     piece bytes, named by their SHA-256
  names/cd/<key>       the digest (hex) of the piece a stable key names (object, version, index)
Every file is written to a unique temporary name in the same folder and renamed into place, so
readers see a whole file or none, and concurrent writers of the same piece (replicas, gateways
of several Ray clusters on one machine) race harmlessly: the content is identical. Beyond
`max_bytes`, the least recently used data files (mtime, touched on every hit) are deleted down
to 90% of the bound; a reader that opened a file before it was deleted still reads it whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time

from warmstart.errors import DigestMismatch

LOW_WATER = 0.9


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


class ChunkCache:
    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        os.makedirs(os.path.join(root, "names"), exist_ok=True)
        self._lock = threading.Lock()
        self._usage: int | None = None  # bytes in data/, counted lazily

    # paths
    def data_path(self, digest: str) -> str:
        return os.path.join(self.root, "data", digest[:2], digest)

    def name_path(self, key: str) -> str:
        return os.path.join(self.root, "names", key[:2], key)

    # data, by digest
    def get(self, digest: str, *, verify: bool = True) -> bytes | None:
        """The bytes named `digest`, or None. With `verify`, a file that does not hash to its
        name is deleted and reported as missing (a damaged cache heals itself)."""
        path = self.data_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if verify and sha256(data) != digest:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return data

    def put(self, data, digest: str | None = None, *, verified: bool = False) -> str:
        """Stores `data`; returns its digest. A given `digest` must match (`verified`: the
        caller has just hashed `data` itself, so it is not hashed again)."""
        actual = digest if (verified and digest) else sha256(data)
        if digest is not None and digest != actual:
            raise DigestMismatch(f"chunk cache: bytes hash to {actual}, not {digest}")
        path = self.data_path(actual)
        if os.path.exists(path):
            with contextlib.suppress(OSError):
                os.utime(path)
            return actual
        _write_atomic(path, data)
        with self._lock:
            if self._usage is not None:
                self._usage += len(data)
            over = self._usage is None or self._usage > self.max_bytes
        if over:
            self.evict()
        return actual

    # names -> digests
    def lookup(self, key: str) -> str | None:
        try:
            with open(self.name_path(key)) as f:
                digest = f.read().strip()
        except FileNotFoundError:
            return None
        return digest if len(digest) == 64 else None

    def remember(self, key: str, digest: str) -> None:
        _write_atomic(self.name_path(key), digest.encode())

    def get_named(self, key: str, *, verify: bool = True) -> tuple[str, bytes] | None:
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

    # size bound
    def usage(self) -> int:
        return sum(size for _, size, _ in self._scan())

    def evict(self) -> int:
        """Deletes least recently used data files until usage <= 90% of the bound (only when
        over it). One process at a time (flock); returns the bytes freed."""
        freed = 0
        with open(os.path.join(self.root, ".evict.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                files = sorted(self._scan(), key=lambda f: f[2])
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
                with self._lock:
                    self._usage = usage
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return freed

    def _scan(self):
        top = os.path.join(self.root, "data")
        for sub in os.scandir(top):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.startswith(".tmp"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    yield entry.path, st.st_size, st.st_mtime


def _write_atomic(path: str, data) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
