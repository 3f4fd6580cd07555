"""Snapshot bookkeeping for the containerd snapshotter: pure metadata plus mount plans.

A `SnapshotDB` keeps every snapshot (key, kind, parent, labels, times, and for a lazy one the
warmstart image it shows) in one JSON file under the snapshotter's root, rewritten atomically
after each change, so the set survives a restart. `mounts_for` decides the mounts containerd
gets: a bind mount for a snapshot without parents, overlayfs otherwise (upper and work
folders for an active snapshot, read-only lower folders for a view). No I/O but the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

from warmstart.errors import ConfigError, NotFound, WarmstartError

ACTIVE, VIEW, COMMITTED = "active", "view", "committed"


class AlreadyExists(WarmstartError, FileExistsError):
    """A snapshot key is taken (for a lazy layer: containerd need not fetch it)."""


class FailedPrecondition(WarmstartError):
    """The snapshot is in the wrong state for the call (not active, has children, ...)."""


@dataclass
class Snapshot:
    id: str
    kind: str
    parent: str = ""
    labels: dict = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    lazy: dict | None = None  # {"store": uri, "image": digest, "top": bool}


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


class SnapshotDB:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, "metadata.json")
        self.lock = threading.RLock()
        os.makedirs(os.path.join(self.root, "snapshots"), exist_ok=True)
        self.snapshots: dict[str, Snapshot] = {}
        self.next_id = 1
        if os.path.isfile(self.path):
            with open(self.path) as f:
                doc = json.load(f)
            self.next_id = int(doc["next_id"])
            self.snapshots = {k: Snapshot(**v) for k, v in doc["snapshots"].items()}

    def save(self) -> None:
        doc = {"next_id": self.next_id,
               "snapshots": {k: asdict(v) for k, v in sorted(self.snapshots.items())}}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".metadata-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def dir(self, snap: Snapshot, part: str = "fs") -> str:
        return os.path.join(self.root, "snapshots", snap.id, part)

    def get(self, key: str) -> Snapshot:
        snap = self.snapshots.get(key)
        if snap is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return snap

    def create(self, key: str, kind: str, parent: str, labels: dict,
               lazy: dict | None = None) -> Snapshot:
        if key in self.snapshots:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        if parent and self.get(parent).kind != COMMITTED:
            raise FailedPrecondition(f"parent {parent!r} is not committed")
        now = time.time_ns()
        snap = Snapshot(str(self.next_id), kind, parent, dict(labels), now, now, lazy)
        self.next_id += 1
        for part in ("fs", "work"):
            os.makedirs(self.dir(snap, part), exist_ok=True)
        self.snapshots[key] = snap
        return snap

    def commit(self, name: str, key: str, labels: dict) -> Snapshot:
        snap = self.get(key)
        if snap.kind != ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is a {snap.kind}, not active")
        if name in self.snapshots:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        del self.snapshots[key]
        snap.kind, snap.updated_ns = COMMITTED, time.time_ns()
        snap.labels.update(labels)
        self.snapshots[name] = snap
        return snap

    def children(self, key: str) -> list[str]:
        return sorted(k for k, s in self.snapshots.items() if s.parent == key)

    def remove(self, key: str) -> Snapshot:
        snap = self.get(key)
        if self.children(key):
            raise FailedPrecondition(f"snapshot {key!r} has children {self.children(key)}")
        del self.snapshots[key]
        return snap

    def chain(self, key: str) -> list[Snapshot]:
        """`key`'s committed ancestors, nearest first."""
        out, seen = [], set()
        parent = self.get(key).parent
        while parent:
            if parent in seen:
                raise ConfigError(f"snapshot metadata has a parent loop at {parent!r}")
            seen.add(parent)
            snap = self.get(parent)
            out.append(snap)
            parent = snap.parent
        return out


def mounts_for(db: SnapshotDB, key: str) -> list[Mount]:
    """The mounts that show snapshot `key` (pure given the metadata)."""
    snap = db.get(key)
    lowers = [db.dir(s) for s in db.chain(key)]
    if snap.kind == ACTIVE:
        if not lowers:
            return [Mount("bind", db.dir(snap), ("rw", "rbind"))]
        return [Mount("overlay", "overlay", (f"workdir={db.dir(snap, 'work')}",
                                             f"upperdir={db.dir(snap)}",
                                             f"lowerdir={':'.join(lowers)}"))]
    if not lowers:
        return [Mount("bind", db.dir(snap), ("ro", "rbind"))]
    if len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    return [Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]
