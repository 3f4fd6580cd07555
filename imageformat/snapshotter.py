"""`warmstart image snapshotter`: a containerd remote snapshotter (a `proxy_plugins` socket).

It serves containerd's snapshots API (Prepare, View, Mounts, Commit, Remove, Stat, Update,
Usage, List, Cleanup) over gRPC on a unix socket. Ordinary layers get ordinary overlayfs
snapshots under `--root`. When containerd prepares a layer of an image whose registry holds a
warmstart twin (the labels a pulling client passes name the image and its layers, see
`lazy.py`), the layer is not downloaded: the top layer's snapshot becomes a lazy FUSE mount of
the whole twin and the layers below it empty placeholders, and Prepare answers ALREADY_EXISTS
so containerd skips the fetch. Metadata survives a restart; lazy mounts are mounted again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures

from warmstart.errors import NotFound, WarmstartError

from . import containerd_api
from .snapshots import (ACTIVE, COMMITTED, VIEW, AlreadyExists, FailedPrecondition,
                        SnapshotDB, mounts_for)

log = logging.getLogger("warmstart.imageformat.snapshotter")

LABEL_TARGET = "containerd.io/snapshot.ref"


def _du(path: str) -> tuple[int, int]:
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes


def make_service(api, db: SnapshotDB, lazy):
    import grpc
    from google.protobuf import empty_pb2, timestamp_pb2
    pb = api.snapshots_pb2
    kinds = {ACTIVE: pb.ACTIVE, VIEW: pb.VIEW, COMMITTED: pb.COMMITTED}

    def abort(ctx, exc: Exception):
        code = (grpc.StatusCode.NOT_FOUND if isinstance(exc, NotFound)
                else grpc.StatusCode.ALREADY_EXISTS if isinstance(exc, AlreadyExists)
                else grpc.StatusCode.FAILED_PRECONDITION
                if isinstance(exc, FailedPrecondition) else grpc.StatusCode.UNKNOWN)
        ctx.abort(code, str(exc))

    def guarded(fn):
        def call(self, req, ctx):
            try:
                with db.lock:
                    return fn(self, req, ctx)
            except (WarmstartError, OSError) as exc:
                if not isinstance(exc, (NotFound, AlreadyExists)):
                    log.warning("%s: %s", fn.__name__, exc)
                abort(ctx, exc)
        call.__name__ = fn.__name__
        return call

    def mounts(key: str):
        return [api.mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
                for m in mounts_for(db, key)]

    def info(key: str):
        s = db.get(key)
        created, updated = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
        created.FromNanoseconds(s.created_ns)
        updated.FromNanoseconds(s.updated_ns)
        return pb.Info(name=key, parent=s.parent, kind=kinds[s.kind], created_at=created,
                       updated_at=updated, labels=s.labels)

    class Service(api.snapshots_pb2_grpc.SnapshotsServicer):
        def Prepare(self, req, ctx):
            if lazy is not None:  # registry lookups run before the metadata lock is taken
                lazy.look_up(dict(req.labels))
            return self._prepare(req, ctx)

        @guarded
        def _prepare(self, req, ctx):
            labels = dict(req.labels)
            target = labels.get(LABEL_TARGET)
            if target and lazy is not None and lazy.prepare(db, req.key, req.parent, labels,
                                                           target):
                db.save()
                raise AlreadyExists(f"target snapshot {target!r} is lazy: nothing to fetch")
            if lazy is not None:
                lazy.check_parent(db, req.parent)
            db.create(req.key, ACTIVE, req.parent, labels)
            db.save()
            return pb.PrepareSnapshotResponse(mounts=mounts(req.key))

        @guarded
        def View(self, req, ctx):
            db.create(req.key, VIEW, req.parent, dict(req.labels))
            db.save()
            return pb.ViewSnapshotResponse(mounts=mounts(req.key))

        @guarded
        def Mounts(self, req, ctx):
            return pb.MountsResponse(mounts=mounts(req.key))

        @guarded
        def Commit(self, req, ctx):
            db.commit(req.name, req.key, dict(req.labels))
            db.save()
            return empty_pb2.Empty()

        @guarded
        def Remove(self, req, ctx):
            snap = db.remove(req.key)
            db.save()
            if lazy is not None:
                lazy.forget(db, snap)
            _remove_tree(os.path.join(db.root, "snapshots", snap.id))
            return empty_pb2.Empty()

        @guarded
        def Stat(self, req, ctx):
            return pb.StatSnapshotResponse(info=info(req.key))

        @guarded
        def Update(self, req, ctx):
            s = db.get(req.info.name)
            paths = list(req.update_mask.paths)
            if not paths or "labels" in paths:
                s.labels = dict(req.info.labels)
            for p in paths:
                if p.startswith("labels."):
                    k = p[len("labels."):]
                    if k in req.info.labels:
                        s.labels[k] = req.info.labels[k]
                    else:
                        s.labels.pop(k, None)
            s.updated_ns = max(s.updated_ns + 1, time.time_ns())
            db.save()
            return pb.UpdateSnapshotResponse(info=info(req.info.name))

        def List(self, req, ctx):
            with db.lock:
                infos = [info(k) for k in sorted(db.snapshots)]
            for i in range(0, len(infos), 100):
                yield pb.ListSnapshotsResponse(info=infos[i:i + 100])

        @guarded
        def Usage(self, req, ctx):
            s = db.get(req.key)
            if s.lazy:
                return pb.UsageResponse(size=0, inodes=0)  # bytes live in the chunk cache
            size, inodes = _du(db.dir(s))
            return pb.UsageResponse(size=size, inodes=inodes)

        @guarded
        def Cleanup(self, req, ctx):
            known = {s.id for s in db.snapshots.values()}
            base = os.path.join(db.root, "snapshots")
            for name in os.listdir(base):
                if name not in known:
                    _remove_tree(os.path.join(base, name))
            return empty_pb2.Empty()

    return Service()


def _remove_tree(path: str) -> None:
    import shutil
    if os.path.ismount(os.path.join(path, "fs")):
        raise FailedPrecondition(f"{path}/fs is still mounted")
    shutil.rmtree(path, ignore_errors=True)


def serve(socket_path: str, root: str, lazy=None, ready: threading.Event | None = None) -> None:
    """Serves until SIGINT/SIGTERM; `lazy` is a `lazy.LazyLayers` (None: overlay only)."""
    import grpc
    api = containerd_api.load(os.path.join(root, ".cache"))
    db = SnapshotDB(root)
    if lazy is not None:
        lazy.restore(db)
    server = grpc.server(futures.ThreadPoolExecutor(8, thread_name_prefix="warmstart-snap"))
    api.snapshots_pb2_grpc.add_SnapshotsServicer_to_server(make_service(api, db, lazy),
                                                           server)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    server.add_insecure_port(f"unix://{os.path.abspath(socket_path)}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("snapshotter serving on %s (root %s)", socket_path, root)
    if ready is not None:
        ready.set()
    stop.wait()
    server.stop(grace=5).wait()
    if lazy is not None:
        lazy.close()
