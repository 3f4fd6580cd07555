"""One gateway per node: the loader reads s3:// through it, and nodes share pieces over Ray.

`Gateway` (plain Python, the logic) answers reads piece by piece:
  1. from the node-local `ChunkCache` (verified against the digest that names it);
  2. a piece of this node's share (`plan.owner`): a ranged GET from object storage, at most
     once per piece at a time on this node (concurrent readers wait for the one fetch);
  3. any other piece: from the owner's gateway through Ray (`piece.remote()`; the bytes travel
     in Ray's object store). The owner hands back the digest it computed when it read the
     piece from object storage; bytes that do not hash to it, a dead owner, or one slower than
     `peer_timeout` make this node read the piece from object storage itself.
The Ray actor around it is `node_actor.NodeGateway`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

from warmstart.ray_serve import plan
from warmstart.ray_serve.chunk_cache import ChunkCache, sha256
from warmstart.ray_serve.plan import ObjectId
from warmstart.ray_serve.settings import SharingConfig
from warmstart.storage import sync
from warmstart.storage.config import StorageConfig
from warmstart.storage.retry import RetryPolicy
from warmstart.storage.s3 import S3Client
from warmstart.storage.source import Target
from warmstart.storage.uri import S3Uri

log = logging.getLogger("warmstart.ray_serve")
HEAD_TTL = 30.0  # seconds a HEAD answer is reused (objects are versioned by size + ETag)

# (node id, object, piece index) -> (digest, bytes); raises on any failure
PeerFetch = Callable[[str, ObjectId, int], tuple[str, bytes]]


class Gateway:
    def __init__(self, settings: SharingConfig, node_id: str,
                 nodes: Callable[[], tuple[str, ...]] | None = None,
                 peer_fetch: PeerFetch | None = None, on_bytes=None) -> None:
        self.settings = settings
        self.node_id = node_id
        self.cache = ChunkCache(settings.cache_dir.replace("{node_id}", node_id),
                                settings.cache_size)
        self._nodes = nodes or (lambda: (node_id,))
        self._peer_fetch = peer_fetch
        self._on_bytes = on_bytes or (lambda source, n: None)
        self._storage = StorageConfig.from_env(
            endpoint_url=settings.s3_endpoint_url, max_connections=64,
            # one try per request here: a transient failure reaches the loader as a 503,
            # and the loader's retry policy is the one retry loop
            retry=RetryPolicy(max_attempts=1))
        self._client: S3Client | None = None
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._heads: dict[tuple[str, str], tuple[ObjectId, float, float]] = {}
        self._participants: dict[ObjectId, tuple[str, ...]] = {}
        self._failed_peers: set[str] = set()
        self._prefetched: set[ObjectId] = set()
        self._hot: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # key -> piece
        self._hot_bytes = 0
        self._pending: dict[str, tuple[str, bytes]] = {}  # fetched, not yet on disk
        self._pending_bytes = 0
        self._written = threading.Condition(self._lock)
        self._prefetch = ThreadPoolExecutor(max(settings.prefetch, 1),
                                            thread_name_prefix="warmstart-prefetch")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="warmstart-cache-writer")
        self.counters = {"s3_bytes": 0, "peer_bytes": 0, "cache_bytes": 0, "served_bytes": 0,
                         "peer_failures": 0, "digest_mismatches": 0, "s3_requests": 0,
                         "s3_seconds": 0.0, "peer_seconds": 0.0}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # --- metadata, straight from object storage ----------------------------------------
    def head(self, bucket: str, key: str) -> tuple[ObjectId, float]:
        now = time.monotonic()
        with self._lock:
            hit = self._heads.get((bucket, key))
        if hit and now - hit[2] < HEAD_TTL:
            return hit[0], hit[1]
        info = sync.run(self._s3().head(S3Uri(bucket, key)))
        obj = ObjectId(bucket, key, info.size, info.etag)
        mtime = info.mtime if info.mtime is not None else time.time()
        with self._lock:
            self._heads[(bucket, key)] = (obj, mtime, now)
        return obj, mtime

    def list(self, bucket: str, prefix: str, delimiter: str, token: str | None,
             max_keys: int) -> tuple[list[dict], list[str], str | None]:
        resp = sync.run(self._s3().list_page(bucket, prefix, delimiter, token, max_keys))
        contents = [{"Key": o["Key"], "Size": int(o["Size"]), "ETag": o.get("ETag", ""),
                     "LastModified": o["LastModified"].strftime("%Y-%m-%dT%H:%M:%S.000Z")}
                    for o in resp.get("Contents", [])]
        prefixes = [p["Prefix"] for p in resp.get("CommonPrefixes", [])]
        return contents, prefixes, resp.get("NextContinuationToken")

    # --- data ---------------------------------------------------------------------------
    def read(self, obj: ObjectId, offset: int, length: int) -> Iterator[memoryview]:
        """Bytes [offset, offset + length) of `obj`, as blocks in order."""
        size = self.settings.piece_size
        if obj.size < size or self.settings.mode == "off":  # small: not worth sharing
            data = self._get_range(obj, offset, length)
            self._count("served_bytes", length)
            yield memoryview(data)
            return
        self._start_prefetch(obj)
        for index in plan.pieces_in_range(offset, length, obj.size, size):
            piece_start = index * size
            data = self.piece(obj, index)
            lo = max(offset, piece_start) - piece_start
            hi = min(offset + length, piece_start + len(data)) - piece_start
            self._count("served_bytes", hi - lo)
            yield memoryview(data)[lo:hi]

    def _in_memory(self, key: str) -> tuple[str, bytes] | None:
        with self._lock:
            hot = self._hot.get(key)
            if hot is not None:
                self._hot.move_to_end(key)
                return hot
            return self._pending.get(key)

    def piece(self, obj: ObjectId, index: int) -> bytes:
        key = self._key(obj, index)
        hot = self._in_memory(key)
        if hot is None:
            hot = self._single_flight(obj, index, self._obtain)
            self._keep_hot(key, hot)
        return hot[1]

    def _keep_hot(self, key: str, piece: tuple[str, bytes]) -> None:
        """Recently used pieces stay in memory: the loader's requests do not line up with
        pieces, so most pieces are asked for twice, and re-reading + re-hashing costs."""
        n = len(piece[1])
        with self._lock:
            if key in self._hot or n > self.settings.memory_size:
                return
            self._hot[key] = piece
            self._hot_bytes += n
            while self._hot_bytes > self.settings.memory_size:
                _, (_, old) = self._hot.popitem(last=False)
                self._hot_bytes -= len(old)

    def piece_for_peer(self, obj: ObjectId, index: int) -> tuple[str, bytes]:
        """A piece this node owns, with the digest it had when it was read from object
        storage. The cached copy is not re-hashed here: the asking node checks it."""
        key = self._key(obj, index)
        hot = self._in_memory(key)
        if hot is not None:
            return hot
        hit = self.cache.get_named(key, verify=False)
        if hit is not None:
            return hit
        return self._single_flight(obj, index, self._from_storage)

    def _key(self, obj: ObjectId, index: int) -> str:
        return plan.piece_key(obj, self.settings.piece_size, index)

    def _single_flight(self, obj: ObjectId, index: int, produce) -> tuple[str, bytes]:
        key = self._key(obj, index)
        with self._lock:
            fut = self._inflight.get(key)
            mine = fut is None
            if mine:
                fut = self._inflight[key] = Future()
        if not mine:
            return fut.result()
        try:
            result = produce(obj, index)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _obtain(self, obj: ObjectId, index: int) -> tuple[str, bytes]:
        key = self._key(obj, index)
        hit = self._in_memory(key)
        if hit is not None:
            return hit
        hit = self.cache.get_named(key)
        if hit is not None:
            self._count("cache_bytes", len(hit[1]))
            self._on_bytes("cache", len(hit[1]))
            return hit
        owner = self._owner(obj, index)
        if owner != self.node_id and owner not in self._failed_peers:
            got = self._from_peer(owner, obj, index)
            if got is not None:
                return got
        return self._from_storage(obj, index)

    def _from_peer(self, owner: str, obj: ObjectId, index: int) -> tuple[str, bytes] | None:
        what = f"{obj.name} piece {index} from node {owner[:12]}"
        started = time.perf_counter()
        try:
            digest, data = self._peer_fetch(owner, obj, index)
        except Exception as exc:  # noqa: BLE001 - any peer failure means: read it ourselves
            self._count("peer_failures")
            with self._lock:
                self._failed_peers.add(owner)
            log.warning("warmstart gateway: %s failed (%s: %s); reading object storage "
                        "instead, and for this node's later pieces too", what,
                        type(exc).__name__, str(exc)[:200])
            return None
        self._count("peer_seconds", time.perf_counter() - started)
        if sha256(data) != digest:
            self._count("digest_mismatches")
            log.warning("warmstart gateway: %s does not match its digest %s; reading it "
                        "from object storage", what, digest[:16])
            return None
        self._store(self._key(obj, index), data, digest)
        self._count("peer_bytes", len(data))
        self._on_bytes("peer", len(data))
        return digest, data

    def _from_storage(self, obj: ObjectId, index: int) -> tuple[str, bytes]:
        piece = plan.pieces(obj.size, self.settings.piece_size)[index]
        data = self._get_range(obj, piece.offset, piece.length)
        digest = sha256(data)
        self._store(self._key(obj, index), data, digest)
        return digest, data

    def _store(self, key: str, data: bytes, digest: str) -> None:
        """Writes a verified piece to the node cache off the read path (readers meanwhile
        get it from memory: `_keep_hot`, or the single flight that produced it)."""
        self._keep_hot(key, (digest, data))
        with self._written:  # back-pressure: fetching never runs far ahead of the disk
            self._written.wait_for(lambda: not self._pending or
                                   self._pending_bytes < self.settings.memory_size)
            if key in self._pending:
                return
            self._pending[key] = (digest, data)
            self._pending_bytes += len(data)
        self._writer.submit(self._quiet_store, key, data, digest)

    def _quiet_store(self, key: str, data: bytes, digest: str) -> None:
        try:
            self.cache.put_named(key, data, digest, verified=True)
        except OSError as exc:  # a full or read-only disk costs refetches, not the load
            log.warning("warmstart gateway: cannot cache a piece in %s: %s", self.cache.root,
                        exc)
        finally:
            with self._written:
                if self._pending.pop(key, None) is not None:
                    self._pending_bytes -= len(data)
                self._written.notify_all()

    def _get_range(self, obj: ObjectId, offset: int, length: int) -> bytes:
        started = time.perf_counter()
        data = self._get_range_from_s3(obj, offset, length)
        self._count("s3_seconds", time.perf_counter() - started)
        self._count("s3_requests")
        self._count("s3_bytes", length)
        self._on_bytes("s3", length)
        return data

    def _s3(self) -> S3Client:
        with self._lock:
            if self._client is None:
                self._client = sync.run(S3Client(self._storage).__aenter__())
            return self._client

    def _get_range_from_s3(self, obj: ObjectId, offset: int, length: int) -> bytearray:
        """Received straight into the buffer it returns (no copy into a `bytes`)."""
        buf = bytearray(length)
        sync.run(self._s3().get_into(S3Uri(obj.bucket, obj.key), offset, Target.of(buf),
                                     etag=obj.etag or None))
        return buf

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            sync.run(client.__aexit__(None, None, None))

    # --- shares -------------------------------------------------------------------------
    def _owner(self, obj: ObjectId, index: int) -> str:
        if self.settings.mode != "cluster" or self._peer_fetch is None:
            return self.node_id
        with self._lock:
            nodes = self._participants.get(obj)
        if nodes is None:
            nodes = tuple(sorted(set(self._nodes()) | {self.node_id}))
            with self._lock:
                nodes = self._participants.setdefault(obj, nodes)
        return plan.owner(obj, index, nodes)

    def _start_prefetch(self, obj: ObjectId) -> None:
        """On the first read of `obj`: fetch this node's share ahead, so peers find it."""
        with self._lock:
            if self.settings.prefetch == 0 or obj in self._prefetched:
                return
            self._prefetched.add(obj)
        for p in plan.pieces(obj.size, self.settings.piece_size):
            if self._owner(obj, p.index) == self.node_id:
                self._prefetch.submit(self._quiet_piece, obj, p.index)

    def _quiet_piece(self, obj: ObjectId, index: int) -> None:
        try:
            self.piece(obj, index)
        except Exception as exc:  # noqa: BLE001 - a reader asking for it will see the error
            log.debug("warmstart gateway: prefetch of %s piece %d failed: %s", obj.name,
                      index, exc)

    def flush(self) -> None:
        """Waits until every piece fetched so far is in the node cache."""
        self._writer.submit(lambda: None).result()

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters)
