"""A local content-addressed chunk cache shared by every image and mount on a machine.

Chunks are stored uncompressed as `ROOT/<2 hex>/<64 hex>` and are only ever written after
they were verified against their digest; a file read back from disk is verified again the
first time this process uses it. Concurrent requests for the same chunk wait for one fetch
(single flight). The disk footprint is kept under `max_bytes` by evicting the least recently
used chunks; a small in-memory LRU serves repeated reads of hot chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from warmstart.errors import ConfigError, DigestMismatch

from .model import Chunk

log = logging.getLogger("warmstart.imageformat")
STALE_TMP_SECONDS = 3600  # a temporary chunk file this old has no live writer


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    fetched_bytes: int = 0  # uncompressed bytes of chunks fetched from the store
    evicted: int = 0
    waits: int = 0  # requests that joined a fetch already in flight


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkCache:
    def __init__(self, root: str, max_bytes: int = 8 << 30, memory_bytes: int = 64 << 20):
        if max_bytes <= 0:
            raise ConfigError("chunk cache max_bytes must be positive")
        self.root, self.max_bytes, self.memory_bytes = root, max_bytes, memory_bytes
        os.makedirs(root, exist_ok=True)
        self.lock = threading.Lock()
        self.flights: dict[str, _Flight] = {}
        self.disk: OrderedDict[str, int] = OrderedDict()  # digest -> size, LRU order
        self.disk_bytes = 0
        self.memory: OrderedDict[str, bytes] = OrderedDict()
        self.memory_used = 0
        self.verified: set[str] = set()
        self.stats = CacheStats()
        self._scan()

    def _scan(self) -> None:
        found = []
        stale = time.time() - STALE_TMP_SECONDS
        for sub in os.scandir(self.root):
            if sub.is_dir() and len(sub.name) == 2:
                for f in os.scandir(sub.path):
                    if len(f.name) == 64:
                        st = f.stat()
                        found.append((st.st_atime, f.name, st.st_size))
                    elif f.name.startswith(".tmp-") and f.stat().st_mtime < stale:
                        # left by a writer that was killed before its rename
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(f.path)
        for _, name, size in sorted(found):
            self.disk[name] = size
            self.disk_bytes += size
        self._evict()

    def path(self, digest: str) -> str:
        return os.path.join(self.root, digest[:2], digest)

    def get(self, chunk: Chunk, fetch: Callable[[Chunk], bytes]) -> bytes:
        """The chunk's verified bytes, from memory, disk or (once) from `fetch`."""
        d = chunk.digest
        with self.lock:
            data = self.memory.get(d)
            if data is not None:
                self.memory.move_to_end(d)
                self.stats.hits += 1
                return data
            flight = self.flights.get(d)
            leader = flight is None
            if leader:
                flight = self.flights[d] = _Flight()
            else:
                self.stats.waits += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data
        try:
            data = self._load(chunk)
            if data is None:
                data = fetch(chunk)
                if len(data) != chunk.size or hashlib.sha256(data).hexdigest() != d:
                    raise DigestMismatch(f"chunk {d}: fetched bytes do not match its digest")
                self._store(d, data)
                with self.lock:
                    self.stats.misses += 1
                    self.stats.fetched_bytes += len(data)
            else:
                with self.lock:
                    self.stats.hits += 1
            self._remember(d, data)
            flight.data = data
            return data
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self.lock:
                self.flights.pop(d, None)
            flight.done.set()

    def _load(self, chunk: Chunk) -> bytes | None:
        p = self.path(chunk.digest)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if chunk.digest not in self.verified:
            if len(data) != chunk.size or hashlib.sha256(data).hexdigest() != chunk.digest:
                log.warning("chunk cache: %s is corrupt on disk; fetching it again", p)
                self._drop(chunk.digest)
                return None
            self.verified.add(chunk.digest)
        with self.lock:
            if chunk.digest in self.disk:
                self.disk.move_to_end(chunk.digest)
        return data

    def _store(self, digest: str, data: bytes) -> None:
        p = self.path(digest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        with self.lock:
            self.verified.add(digest)
            if digest not in self.disk:
                self.disk[digest] = len(data)
                self.disk_bytes += len(data)
            self._evict()

    def _evict(self) -> None:
        while self.disk_bytes > self.max_bytes and len(self.disk) > 1:
            digest, size = self.disk.popitem(last=False)
            self.disk_bytes -= size
            self.stats.evicted += 1
            try:
                os.unlink(self.path(digest))
            except FileNotFoundError:
                pass

    def _drop(self, digest: str) -> None:
        with self.lock:
            size = self.disk.pop(digest, None)
            if size is not None:
                self.disk_bytes -= size
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def _remember(self, digest: str, data: bytes) -> None:
        with self.lock:
            if digest in self.memory or len(data) > self.memory_bytes:
                return
            self.memory[digest] = data
            self.memory_used += len(data)
            while self.memory_used > self.memory_bytes:
                _, old = self.memory.popitem(last=False)
                self.memory_used -= len(old)
