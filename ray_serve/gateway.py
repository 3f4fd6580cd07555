"""One gateway per node: it lands a checkpoint's pieces on the node, and nodes share pieces.

`Gateway` (plain Python, the logic; the Ray actor around it is `node_actor.NodeGateway`, and
a replica on a node whose gateway is not up yet runs one in its own process, see `replica`):
  * `prepare(uri)` lists the checkpoint's objects in object storage, creates their files in
    the node-local landing area (`landing`: 0700 folder, 0600 files, full size, sparse),
    lands small objects (indexes, sidecars) at once, and queues every piece of the large
    ones, in file order, for `prefetch` landing workers. It returns at once with the local
    folder and what is already landed: the replica starts loading while pieces arrive.
  * A landing worker gets piece i from object storage when this node owns it (`plan.owner`;
    a ranged GET, retried by warmstart.storage's one policy), else from the owner's gateway
    through Ray (`piece_for_peer`; the bytes travel in Ray's object store) together with
    the SHA-256 the owner computed when it read the piece from object storage: bytes that do
    not match it, a dead owner, or one slower than `peer_timeout` make this node read the
    piece from object storage itself. The verified piece is written in place, then recorded.
  * `wait_ready(file, i)` blocks until piece i of a file is landed (or failed) and returns
    every landed index of that file: the replica's control channel.
A gateway restarted on a warm node re-checks the recorded pieces against their digests once.
Several processes of a node may land one checkpoint at once (the gateway actor and replicas
landing while it starts): each piece is landed under its `claim` (a lock held across
processes), and a lander that gets the claim first reads the record again, taking over what
another process landed meanwhile (trusted as a gateway trusts its own pieces), so each piece
is fetched once per node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from warmstart.errors import IntegrityError, NotFound, WarmstartError
from warmstart.ray_serve import landing, plan
from warmstart.ray_serve.landing import LandedFile, sha256
from warmstart.ray_serve.plan import ObjectId
from warmstart.ray_serve.settings import SharingConfig
from warmstart.storage import sync
from warmstart.storage.config import StorageConfig
from warmstart.storage.s3 import S3Client
from warmstart.storage.source import Target
from warmstart.storage.uri import S3Uri, parse_s3

log = logging.getLogger("warmstart.ray_serve")
LANDED_SUFFIXES = (".safetensors", ".json", ".sums")  # what the loader reads of a folder

# (node id, object, piece index) -> (digest, the bytes: any buffer); raises on any failure
PeerFetch = Callable[[str, ObjectId, int], tuple[str, bytes]]


@dataclass
class _Object:
    obj: ObjectId
    file: LandedFile
    ready: dict[int, str] = field(default_factory=dict)  # index -> digest
    failed: dict[int, BaseException] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)  # being landed by some thread


@dataclass(frozen=True)
class Prepared:
    """What a replica needs to read a checkpoint from the node: `path` is what to load;
    `files` maps each landed file to (piece size, piece count, landed indexes)."""

    path: str
    files: dict[str, tuple[int, int, tuple[int, ...]]]

    @property
    def complete(self) -> bool:
        return all(len(ready) == count for _, count, ready in self.files.values())


class Gateway:
    def __init__(self, settings: SharingConfig, node_id: str,
                 nodes: Callable[[], tuple[str, ...]] | None = None,
                 peer_fetch: PeerFetch | None = None, on_bytes=None,
                 mark: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        # `mark(hop)`: notes the moment of a step (a replica landing for itself times its
        # hops with it: client, listing, first piece, ...); first call per hop wins
        self._mark_hop = mark or (lambda hop: None)
        self.node_id = node_id
        self.root = landing.private_dir(settings.cache_dir.replace("{node_id}", node_id)
                                        .replace("{uid}", str(os.getuid())))
        self._nodes = nodes or (lambda: (node_id,))
        self._peer_fetch = peer_fetch
        self._on_bytes = on_bytes or (lambda source, n: None)
        # the gateway is the one retry loop for its requests (the loader reads local files)
        self._storage = StorageConfig.from_env(endpoint_url=settings.s3_endpoint_url,
                                               max_connections=64)
        self._client: S3Client | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inflight: dict[tuple[ObjectId, int], Future] = {}
        self._objects: dict[str, _Object] = {}  # path in a version folder -> object
        self._by_id: dict[ObjectId, _Object] = {}
        self._participants: dict[ObjectId, tuple[str, ...]] = {}
        self._failed_peers: set[str] = set()
        self._workers = ThreadPoolExecutor(max(settings.prefetch, 1),
                                           thread_name_prefix="warmstart-landing")
        self.counters = {"s3_bytes": 0, "peer_bytes": 0, "cache_bytes": 0,
                         "peer_failures": 0, "digest_mismatches": 0, "s3_requests": 0,
                         "s3_seconds": 0.0, "peer_seconds": 0.0, "landed_pieces": 0,
                         "rechecked_bytes": 0, "hash_seconds": 0.0, "claim_wait_seconds": 0.0,
                         "write_seconds": 0.0}

    def _count(self, name: str, n: float = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # --- object storage, through warmstart.storage's one client -------------------------
    def _s3(self) -> S3Client:
        with self._lock:
            if self._client is None:
                self._client = sync.run(S3Client(self._storage).__aenter__())
                self._mark_hop("s3_client")
            return self._client

    def _get_into(self, obj: ObjectId, offset: int, view: memoryview) -> None:
        """Bytes [offset, offset + len(view)) of `obj` into `view` (the mapped file)."""
        started = time.perf_counter()
        sync.run(self._s3().get_into(S3Uri(obj.bucket, obj.key), offset, Target.of(view),
                                     etag=obj.etag or None))
        self._count("s3_seconds", time.perf_counter() - started)
        self._count("s3_requests")
        self._count("s3_bytes", len(view))
        self._on_bytes("s3", len(view))

    def _listing(self, uri: str) -> tuple[str, list[ObjectId]]:
        """(the name to load inside the version folder, the objects to land)."""
        parsed = parse_s3(uri)
        client = self._s3()
        if parsed.key.endswith(".safetensors"):
            info = sync.run(client.head(parsed))
            return (posixpath.basename(parsed.key),
                    [ObjectId(parsed.bucket, parsed.key, info.size, info.etag)])
        if parsed.key.endswith(".json"):
            prefix, target = posixpath.dirname(parsed.key), posixpath.basename(parsed.key)
        else:
            prefix, target = parsed.key.rstrip("/"), ""
        prefix = prefix + "/" if prefix else ""
        objects, token = [], None
        while True:
            page = sync.run(client.list_page(parsed.bucket, prefix, "/", token))
            objects += [ObjectId(parsed.bucket, o["Key"], int(o["Size"]), o.get("ETag", ""))
                        for o in page.get("Contents", []) if o["Key"].endswith(LANDED_SUFFIXES)]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        if not objects:
            raise NotFound(2, f"s3://{parsed.bucket}/{prefix}: no .safetensors objects under "
                              f"this prefix")
        return target, objects

    # --- preparing a checkpoint on the node ---------------------------------------------
    def prepare(self, uri: str, evict: bool = True,
                trusted: dict[ObjectId, dict[int, str]] | None = None) -> Prepared:
        """Creates the checkpoint's files on the node, queues what is not landed yet, and
        returns at once (small objects are landed before it returns). `evict=False` leaves
        eviction to the node's gateway (a replica landing for itself knows only its own
        checkpoint). `trusted`: pieces another lander of this node verified and landed
        (`landed()`), taken without checking their digests again when the record agrees."""
        target, objects = self._listing(uri)
        self._mark_hop("listed")
        version = landing.version_name([(o.key, o.size, o.etag) for o in objects])
        folder = os.path.join(self.root, version)
        with self._lock:  # kept: this version, and objects still landing
            active = {landing.object_name(o) for o in objects} | {
                landing.object_name(o) for o, e in self._by_id.items()
                if len(e.ready) < e.file.piece_count()}
        if evict and landing.evict(self.root, active, sum(o.size for o in objects),
                                   self.settings.cache_size):
            self._forget_evicted()
        landing.private_dir(folder)
        os.utime(folder)  # recently used: evicted last
        entries = [self._entry(o, (trusted or {}).get(o)) for o in objects]
        paths = []
        for e in entries:  # the version folder names each object as object storage does
            path = os.path.join(folder, posixpath.basename(e.obj.key))
            landing.link(e.file.path, path)
            with self._lock:
                self._objects[path] = e
            paths.append(path)
        for e in entries:  # small ones now: the loader reads indexes and headers first
            if e.obj.size < self.settings.piece_size:
                self.land(e, 0)
        self._mark_hop("small_landed")
        big = [e for e in entries if e.obj.size >= self.settings.piece_size]
        # every file's first piece first (the loader reads all headers before any data),
        # then this node's own share in file order (object storage answers at once, while
        # a peer's gateway may still be starting), then the peers' pieces; a replica waiting
        # for a piece not started yet lands it itself (wait_ready), so the order is a hint,
        # never a deadlock
        rest = [(e, i) for e in big for i in range(1, e.file.piece_count())]
        queue = [(e, 0) for e in big] + sorted(
            rest, key=lambda p: self._owner(p[0].obj, p[1]) != self.node_id)
        for e, index in queue:
            if index not in e.ready:
                self._workers.submit(self._quiet_land, e, index)
        with self._lock:
            files = {path: (e.file.piece_size, e.file.piece_count(), tuple(sorted(e.ready)))
                     for path, e in zip(paths, entries)}
        return Prepared(os.path.join(folder, target) if target else folder, files)

    def _forget_evicted(self) -> None:
        """Drops the entries whose files eviction deleted (open readers keep their bytes)."""
        with self._lock:
            gone = [o for o, e in self._by_id.items() if not os.path.exists(e.file.path)]
            entries = [self._by_id.pop(o) for o in gone]
            for path in [p for p, e in self._objects.items() if e in entries]:
                del self._objects[path]
        for e in entries:
            e.file.close()

    def _entry(self, obj: ObjectId, trusted: dict[int, str] | None = None) -> _Object:
        """The landed file of one object version (opened, and its record checked, once;
        recorded pieces in `trusted` with the same digest are not hashed again)."""
        with self._lock:
            entry = self._by_id.get(obj)
            if entry is not None:
                entry.failed.clear()  # a new prepare tries failed pieces again
                return entry
        objects = landing.private_dir(os.path.join(self.root, landing.OBJECTS))
        file = LandedFile(os.path.join(objects, landing.object_name(obj)), obj.size,
                          self.settings.piece_size)
        entry = _Object(obj, file)
        trusted = trusted or {}
        for index, digest in file.recorded().items():  # a warm node: check once, then trust
            if index >= file.piece_count():
                continue
            if trusted.get(index) != digest:
                self._count("rechecked_bytes", file.piece_span(index)[1])
                if not file.check(index, digest):
                    continue
            entry.ready[index] = digest
        warm = sum(file.piece_span(i)[1] for i in entry.ready)
        self._count("cache_bytes", warm)
        self._on_bytes("cache", warm)
        with self._lock:
            kept = self._by_id.setdefault(obj, entry)
        if kept is not entry:  # another thread opened it first
            file.close()
        return kept

    def _quiet_land(self, entry: _Object, index: int) -> None:
        try:
            self.land(entry, index)
        except Exception as exc:  # noqa: BLE001 - handed to the replica by wait_ready
            log.warning("warmstart gateway: landing %s piece %d failed: %s", entry.obj.name,
                        index, exc)

    def land(self, entry: _Object, index: int) -> None:
        """Piece `index` of `entry` in its file, from a peer or object storage; a piece
        another thread is landing already is left to it."""
        with self._lock:
            if index in entry.ready or index in entry.started:
                return
            entry.started.add(index)
        try:
            asked = time.perf_counter()
            with entry.file.claim(index):  # the node's other landers wait for this one
                self._count("claim_wait_seconds", time.perf_counter() - asked)
                if self._adopt(entry, index) is not None:
                    return  # another process of the node landed it
                owner = self._owner(entry.obj, index)
                got = None
                small = entry.obj.size < self.settings.piece_size  # not worth a round trip
                if not small and owner != self.node_id and owner not in self._failed_peers:
                    got = self._from_peer(owner, entry.obj, index)
                if got is None:
                    got = self._single_flight(entry, index, claimed=True)
                else:
                    self._write(entry, index, *got)
        except BaseException as exc:
            with self._changed:
                entry.failed[index] = exc
                entry.started.discard(index)
                self._changed.notify_all()
            raise

    def _write(self, entry: _Object, index: int, digest: str, data) -> None:
        with self._lock:
            if index in entry.ready:
                return
        started = time.perf_counter()
        entry.file.write(index, data, digest)
        self._count("write_seconds", time.perf_counter() - started)
        self._mark(entry, index, digest, recorded=True)

    def _mark(self, entry: _Object, index: int, digest: str, recorded: bool = False) -> None:
        with self._lock:
            if index in entry.ready:
                return
        if not recorded:
            entry.file.record(index, digest)
        with self._changed:
            entry.ready[index] = digest
            entry.failed.pop(index, None)
            entry.started.discard(index)
            self.counters["landed_pieces"] += 1
            self._changed.notify_all()
        self._mark_hop("first_piece_landed")

    def _digest(self, data) -> str:
        """`sha256(data)`, its time counted in `hash_seconds`."""
        started = time.perf_counter()
        digest = sha256(data)
        self._count("hash_seconds", time.perf_counter() - started)
        return digest

    def _adopt(self, entry: _Object, index: int) -> str | None:
        """Takes over the pieces other processes of the node recorded since this one last
        looked (each was landed under its claim while this one was up, so it is trusted as
        our own); returns the digest of piece `index` when it is landed."""
        for i, digest in entry.file.recorded(new_only=True).items():
            if i < entry.file.piece_count():
                self._mark(entry, i, digest, recorded=True)
        with self._lock:
            return entry.ready.get(index)

    def _single_flight(self, entry: _Object, index: int,
                       claimed: bool = False) -> tuple[str, bytes]:
        """Reads piece `index` from object storage and lands it; concurrent callers for the
        same piece wait for the one read. `claimed`: the caller holds the piece's claim."""
        key = (entry.obj, index)
        with self._lock:
            fut = self._inflight.get(key)
            mine = fut is None
            if mine:
                fut = self._inflight[key] = Future()
        if not mine:
            return fut.result()
        try:
            with contextlib.nullcontext() if claimed else entry.file.claim(index):
                digest = None if claimed else self._adopt(entry, index)
                if digest is None:
                    start, length = entry.file.piece_span(index)
                    with entry.file.span(index) as view:
                        if length:
                            self._get_into(entry.obj, start, view)
                        digest = self._digest(view)
                    self._mark(entry, index, digest)
            result = (digest, None)  # the bytes are in the file
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._lock:
                self._inflight.pop(key, None)

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
        if self._digest(data) != digest:
            self._count("digest_mismatches")
            log.warning("warmstart gateway: %s does not match its digest %s; reading it "
                        "from object storage", what, digest[:16])
            return None
        self._count("peer_bytes", len(data))
        self._on_bytes("peer", len(data))
        return digest, data

    # --- what replicas and peers call ---------------------------------------------------
    def wait_ready(self, path: str, index: int, timeout: float | None = None) -> tuple[int, ...]:
        """Blocks until piece `index` of the landed file `path` is on the node; returns every
        landed index of that file. The landing's own error if it failed."""
        with self._lock:
            entry = self._objects.get(path)
            if entry is None:
                raise NotFound(2, f"{path}: not a file this node's gateway is landing")
            if not 0 <= index < entry.file.piece_count():
                raise IntegrityError(f"{path}: has no piece {index} (it has "
                                     f"{entry.file.piece_count()})")
            idle = index not in entry.ready and index not in entry.started
        if idle:  # asked for before its turn
            with contextlib.suppress(Exception):  # its error is reported just below
                self.land(entry, index)
        with self._changed:
            ok = self._changed.wait_for(lambda: index in entry.ready or index in entry.failed,
                                        timeout)
            if index in entry.failed:
                exc = entry.failed[index]
                if isinstance(exc, WarmstartError):
                    raise exc
                raise WarmstartError(f"{entry.obj.name} piece {index}: landing on the node "
                                     f"failed: {exc}") from exc
            if not ok:
                raise TimeoutError(f"{entry.obj.name} piece {index}: not on the node after "
                                   f"{timeout}s")
            return tuple(sorted(entry.ready))

    def ready_now(self, path: str) -> tuple[int, ...]:
        """The pieces of the landed file `path` this lander knows are on the node (no wait)."""
        with self._lock:
            entry = self._objects.get(path)
            return () if entry is None else tuple(entry.ready)

    def piece_for_peer(self, obj: ObjectId, index: int) -> tuple[str, bytes]:
        """A piece this node owns, with the digest it had when it was read from object
        storage (the asking node checks the bytes against it)."""
        entry = self._entry(obj)  # a node whose own replica has not asked yet lands it too
        with self._lock:
            digest = entry.ready.get(index)
        if digest is None:
            digest = self._single_flight(entry, index)[0]
        return digest, entry.file.read(index)

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

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters)

    def landed(self) -> dict[ObjectId, dict[int, str]]:
        """Every piece this gateway knows to be on the node, with its digest."""
        with self._lock:
            return {o: dict(e.ready) for o, e in self._by_id.items()}

    def close(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            client, self._client = self._client, None
            entries = list(self._by_id.values())
        for e in entries:
            e.file.close()
        if client is not None:
            sync.run(client.__aexit__(None, None, None))
